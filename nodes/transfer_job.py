"""One transfer, independent of how it was asked for: the LoRA-X Transfer and Save nodes and the
command line all run it through here, so they cannot drift apart."""

from __future__ import annotations

import os

from lorax.errors import LoraxError
from lorax.kohya_export import save_kohya_lora
from lorax.report import text_report
from lorax.layer_map import MODES as LAYER_MAP_MODES, LayerMap, build_layer_map, load_user_map, role_of
from lorax.skip_reasons import why_left_out
from lorax.transfer import TransferSettings, similarity_scorer, transfer_deltas

from . import bridge
from .handles import AdapterHandle, TransferHandle

TE_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "clip_")


#: The layer-map inputs the Transfer and Similarity Report nodes share.
LAYER_MAP_INPUTS = {
    "layer_map": (list(LAYER_MAP_MODES), {"tooltip": (
        "How target layers find their source layer. similarity: by name where both models have the same "
        "blocks; where the target has fewer (SSD-1B, Segmind Vega, BK-SDM), layers of the same role are paired "
        "by subspace similarity, keeping their order. name: equal keys only.")}),
    "layer_map_json": ("STRING", {"default": "", "multiline": True, "tooltip": (
        'Optional map for exotic pairs, as JSON {"target key": "source key", ...} with the models\' own keys '
        "(e.g. diffusion_model.input_blocks.7.1.transformer_blocks.0.attn1.to_q.weight); it overrides the mode "
        "for the layers it names.")}),
}


def parse_layer_map_json(text: str) -> dict[str, str] | None:
    """The node's optional user map (empty text: none)."""
    if not text or not text.strip():
        return None
    try:
        return load_user_map(text)
    except LoraxError as e:
        raise LoraxError(f"layer_map_json input: {e.detail}") from None


def check_distinct(source_model, target_model) -> None:
    if source_model is target_model or source_model.model is target_model.model:
        raise LoraxError("source and target are the same model; connect the checkpoint the adapter was made "
                         "for as source and a different checkpoint as target")


def layer_map_for(deltas, source: bridge.PatcherWeights, target: bridge.PatcherWeights, engine, *, mode: str,
                  rank: int, user_map=None, allow_reuse: bool = False) -> LayerMap | None:
    """The target←source layer map over the roles the adapter touches (None: same keys)."""
    if mode == "name" and not user_map:
        return None
    roles = {role_of(k, d.shape) for k, d in deltas.items()}

    def shapes(weights):
        return {k: weights.shape(k) for k in weights.keys()
                if len(weights.shape(k)) >= 2 and role_of(k, weights.shape(k)) in roles}

    return build_layer_map(shapes(source), shapes(target), mode=mode, user_map=user_map, allow_reuse=allow_reuse,
                           scorer=similarity_scorer(source, target, engine, rank))


def run_transfer(source_model, target_model, adapter: AdapterHandle, settings: TransferSettings, engine, *,
                 strength: float = 1.0, clip=None, source_clip=None, progress=None, layer_map_mode: str = "similarity",
                 user_map=None) -> TransferHandle:
    """Read the adapter against the source, transfer every layer, and describe what happened.

    ``layer_map_mode`` ``similarity`` pairs layers by role and Φ̂ where the two models have different
    numbers of blocks (it coincides with pairing by name where they do not); ``name`` pairs equal keys
    only. ``user_map`` (``{"target key": "source key"}``) overrides both.
    """
    check_distinct(source_model, target_model)
    # Text-encoder modules are read only when there is a target CLIP to put them on; otherwise
    # they stay unmapped and are reported as skipped (a lone source_clip must not swallow them).
    deltas = adapter.deltas_for(source_model, engine, clip=(source_clip or clip) if clip is not None else None)
    unet_part, te_part = bridge.split_by_owner(deltas.deltas, source_model)
    source_w, target_w = bridge.PatcherWeights(source_model), bridge.PatcherWeights(target_model)
    lmap = layer_map_for(unet_part, source_w, target_w, engine, mode=layer_map_mode, rank=settings.rank,
                         user_map=user_map)
    result = transfer_deltas(unet_part, source_w, target_w, settings, engine, adapter_ranks=deltas.adapter_ranks,
                             layer_map=lmap, progress=progress)
    clip_result = None
    if clip is not None and te_part:
        clip_result = transfer_deltas(te_part, bridge.PatcherWeights((source_clip or clip).patcher),
                                      bridge.PatcherWeights(clip.patcher), settings, engine,
                                      adapter_ranks=deltas.adapter_ranks)
    te_skipped = [m for m in deltas.unmapped if m.startswith(TE_PREFIXES)]
    other_unmapped = [m for m in deltas.unmapped if m not in te_skipped]

    rows = [layer.row() for layer in result.layers]
    if clip_result is not None:
        rows += [layer.row() for layer in clip_result.layers]
    rows += [{"key": m, "decision": "skipped: text encoder (no CLIP connected)", "phi": None} for m in te_skipped]
    rows += [{"key": k, "decision": f"skipped: {why}", "phi": None} for k, why in deltas.unsupported.items()]
    notes = [result.summary()]
    notes += ["  " + line for line in why_left_out(result.layers)]
    if clip_result is not None:
        notes.append("text encoder: " + clip_result.summary())
        notes += ["  " + line for line in why_left_out(clip_result.layers)]
    if lmap is not None:
        notes.append(lmap.summary())
    if te_skipped:
        notes.append(f"{len(te_skipped)} text-encoder modules skipped: connect the target's CLIP to transfer them.")
    if other_unmapped:
        notes.append(f"{len(other_unmapped)} adapter modules match no layer of the model (first: {other_unmapped[0]}).")
    if clip is not None and source_clip is None and te_part:
        notes.append("No source CLIP connected: text-encoder layers were compared with the target's own.")
    title = (f"LoRA-X Transfer of {adapter.description}: {bridge.model_kind(source_model)} → "
             f"{bridge.model_kind(target_model)}, mode {settings.mode}")
    version, arch = bridge.base_model_names(target_model)
    return TransferHandle(
        adapter=adapter, result=result, clip_result=clip_result, strength=strength,
        kohya_names=bridge.kohya_names(bridge.adapter_key_map(target_model, clip)), base_model_version=version,
        architecture=arch, target_kind=bridge.model_kind(target_model), skipped_text_encoder=te_skipped,
        rows=rows, report=text_report(rows, title=title, threshold=settings.threshold, notes=notes), title=title)


def save_transfer(handle: TransferHandle, path: str | os.PathLike, *, bake_strength: bool = True) -> int:
    """Write the transferred adapter as a kohya LoRA; returns the number of layers written."""
    scale = handle.strength if bake_strength else 1.0
    deltas = {}
    for res in [handle.result] + ([handle.clip_result] if handle.clip_result is not None else []):
        for key, delta in res.deltas.items():
            name = handle.kohya_names.get(key)
            if name is None:
                raise LoraxError("no kohya module name for this model key; the target's key map lacks it", key=key)
            deltas[name] = delta.scaled(scale)
    settings = handle.result.settings
    provenance = {
        "tool": "LoRA-X for ComfyUI", "source_adapter": handle.adapter.name, "adapter_kind": handle.adapter.kind,
        "target_model": handle.target_kind, "rank": settings.rank, "threshold": settings.threshold,
        "mode": settings.mode, "strength_baked": scale, "layers": handle.result.counts(),
        "text_encoder_skipped": len(handle.skipped_text_encoder),
    }
    save_kohya_lora(path, deltas, base_model_version=handle.base_model_version, architecture=handle.architecture,
                    provenance=provenance)
    return len(deltas)
