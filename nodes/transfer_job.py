"""One transfer, independent of how it was asked for: the LoRA-X Transfer and Save nodes and the
command line all run it through here, so they cannot drift apart."""

from __future__ import annotations

import os

import torch

from lorax.errors import LoraxError
from lorax.fused import base_key, merge_slices, parse_slice_key, with_slices
from lorax.kohya_export import save_kohya_lora
from lorax.report import family_of, how_counts, kept_phrase, text_report
from lorax.layer_map import MODES as LAYER_MAP_MODES, LayerMap, build_layer_map, load_user_map, role_of
from lorax.skip_reasons import why_left_out
from lorax.transfer import Decision, TransferSettings, similarity_scorer, transfer_deltas
from lorax.verdict import StockLoaderView, Verdict, common_widths

from . import bridge
from .api import io
from .handles import AdapterHandle, TransferHandle

TE_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "clip_")


def layer_map_inputs() -> list:
    """The layer-map inputs the Transfer and Similarity Report nodes share (optional, in this order)."""
    return [
        # The default the docs and execute() give; without it the widget showed "name" (the first option).
        io.Combo.Input("layer_map", options=list(LAYER_MAP_MODES), default="similarity", optional=True, tooltip=(
            "How target layers find their source layer. similarity: by name where both models have the same "
            "blocks; where the target has fewer (SSD-1B, Segmind Vega, BK-SDM), layers of the same role are paired "
            "by subspace similarity, keeping their order. name: equal keys only.")),
        io.String.Input("layer_map_json", default="", multiline=True, optional=True, tooltip=(
            'Optional map for exotic pairs, as JSON {"target key": "source key", ...} with the models\' own keys '
            "(e.g. diffusion_model.input_blocks.7.1.transformer_blocks.0.attn1.to_q.weight); it overrides the mode "
            "for the layers it names.")),
    ]


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
    # A slice is paired through its fused weight (lorax.transfer maps the slice along).
    roles = {role_of(k, source.shape(k)) for k in {base_key(k) for k in deltas} if source.shape(k) is not None}

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

    The report opens with the compatibility verdict (:mod:`lorax.verdict`); an adapter none of whose
    modules lands on a layer fails with that sentence before any SVD is run.
    """
    check_distinct(source_model, target_model)
    cache_before = engine.cache_counters()
    # Text-encoder modules are read only when there is a target CLIP to put them on; otherwise
    # they stay unmapped and are reported as skipped (a lone source_clip must not swallow them).
    deltas = adapter.deltas_for(source_model, engine, clip=(source_clip or clip) if clip is not None else None)
    te_skipped = [m for m in deltas.unmapped if m.startswith(TE_PREFIXES)]
    other_unmapped = [m for m in deltas.unmapped if m not in te_skipped]
    if not deltas.deltas and not deltas.unsupported:
        # Before any SVD: nothing of the adapter lands on a layer of this model.
        raise bridge.no_fit_error(bridge.model_kind(target_model), deltas.modules - len(te_skipped),
                                  path=adapter.path)
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
    layers = result.layers + (clip_result.layers if clip_result is not None else [])
    stock = StockLoaderView.of({k: d.shape for k, d in unet_part.items()}, with_slices(target_w).shape)
    if clip is not None and te_part:
        te_stock = StockLoaderView.of({k: d.shape for k, d in te_part.items()},
                                      with_slices(bridge.PatcherWeights(clip.patcher)).shape)
        stock = StockLoaderView(stock.applies + te_stock.applies, stock.missing + te_stock.missing,
                                stock.other_shape + te_stock.other_shape)
    verdict = compatibility(layers, deltas.modules - len(te_skipped), other_unmapped, len(te_skipped),
                            bridge.model_kind(target_model), settings.threshold, stock=stock)
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
    stored_as = quantized_formats(target_w, [l.target for l in result.layers if l.shape_target is not None])
    if stored_as:
        notes.append(f"target weights stored quantized ({stored_as}): read as the matrices the model computes "
                     "with, one layer dequantized at a time.")
    slices = [l for l in layers if parse_slice_key(l.target) is not None]
    if slices:
        example = slices[0].target
        notes.append(f"{len(slices)} layers are slices of fused weights (e.g. {family_of(example)} = "
                     f"{parse_slice_key(example).describe()}): each slice is decomposed, compared and projected "
                     "on its own and patched back into its rows; the rest of the fused weight is unchanged.")
    if te_skipped:
        notes.append(f"{len(te_skipped)} text-encoder modules skipped: connect the target's CLIP to transfer them.")
    if other_unmapped:
        named = ", ".join(other_unmapped[:4]) + (", …" if len(other_unmapped) > 4 else "")
        notes.append(f"{len(other_unmapped)} adapter modules match no layer of the model: {named}.")
    if clip is not None and source_clip is None and te_part:
        notes.append("No source CLIP connected: text-encoder layers were compared with the target's own.")
    notes.append(engine.cache_note(cache_before))
    title = (f"LoRA-X Transfer of {adapter.description}: {bridge.model_kind(source_model)} → "
             f"{bridge.model_kind(target_model)}, mode {settings.mode}")
    version, arch = bridge.base_model_names(target_model)
    line = verdict.line()
    bridge.log.info("LoRA-X: %s", line)
    return TransferHandle(
        adapter=adapter, result=result, clip_result=clip_result, strength=strength,
        kohya_names=bridge.kohya_names(bridge.adapter_key_map(target_model, clip)), base_model_version=version,
        architecture=arch, target_kind=bridge.model_kind(target_model), skipped_text_encoder=te_skipped,
        rows=rows, report=text_report(rows, title=title, threshold=settings.threshold, notes=notes, verdict=line),
        title=title, verdict=line,
        fused_shapes={s.key: target_w.shape(s.key) for s in (parse_slice_key(l.target) for l in slices)})


def quantized_formats(weights: bridge.PatcherWeights, keys) -> str:
    """``"GGUF Q8_0: 70 layers"``-style summary of the quantized formats among ``keys`` ("" if none)."""
    from collections import Counter

    from lorax.weight_formats import PLAIN_DTYPES, weight_format

    counts = Counter()
    for key in {base_key(k) for k in keys}:
        try:
            stored = weights.stored(key)
        except KeyError:
            continue
        if type(stored) in (torch.Tensor, torch.nn.Parameter) and stored.dtype in PLAIN_DTYPES:
            continue
        counts[weight_format(stored)] += 1
    return ", ".join(f"{fmt}: {n} layer{'s' * (n != 1)}" for fmt, n in counts.most_common())


def compatibility(layers, modules: int, unmapped: list[str], te_skipped: int, target_kind: str,
                  threshold: float, stock: StockLoaderView | None = None) -> Verdict:
    """The verdict's counts: modules that reach a layer of the target, and of the mapped matrix
    layers those that were compared and transferred, how they were moved and how much of the
    adapter's change they keep; with what the stock loader would have done."""
    missing = [l for l in layers if l.decision is Decision.MISSING_IN_TARGET]
    rows = [l.row() for l in layers if l.paired_phi_hat is None]
    mismatched = [l for l in layers if l.decision is Decision.SHAPE_MISMATCH]
    compared = [l for l in layers if l.decision in (Decision.TRANSFERRED, Decision.LOW_SIMILARITY)
                and l.paired_phi_hat is None]
    paired = [l for l in layers if l.decision is Decision.TRANSFERRED and l.paired_phi_hat is not None]
    unscored = [l for l in paired if l.unscored]
    shared = [min(x for x in l.paired_phi_hat if x is not None) for l in paired if not l.unscored]
    kept = [float(l.energy_kept) for l in paired]
    example = unmapped[0] if unmapped else (missing[0].key if missing else None)
    return Verdict(target=target_kind, modules=modules, mapped=max(0, modules - len(unmapped) - len(missing)),
                   compared=len(compared), passed=sum(1 for l in compared if l.decision is Decision.TRANSFERRED),
                   threshold=threshold, unmapped_example=example, text_encoder_skipped=te_skipped,
                   mismatched=len(mismatched), unscored=len(unscored), paired_scored=len(shared),
                   paired_phi=(float(min(shared)), float(max(shared))) if shared else None,
                   widths=common_widths((l.shape_source, l.shape_target) for l in mismatched + unscored),
                   paired_kept=(min(kept), max(kept)) if kept else None, stock=stock,
                   moved=", ".join(f"{n} {h}" for h, n in how_counts(rows).items()),
                   kept=kept_phrase(rows) or "")


def save_transfer(handle: TransferHandle, path: str | os.PathLike, *, bake_strength: bool = True) -> int:
    """Write the transferred adapter as a kohya LoRA; returns the number of layers written."""
    scale = handle.strength if bake_strength else 1.0
    deltas = {}
    for res in [handle.result] + ([handle.clip_result] if handle.clip_result is not None else []):
        # kohya files name whole modules: the slices of a fused weight become one delta of it.
        for key, delta in merge_slices(res.deltas, handle.fused_shapes.get).items():
            name = handle.kohya_names.get(key)
            if name is None:
                raise LoraxError("no kohya module name for this model key; the target's key map lacks it", key=key)
            deltas[name] = delta.scaled(scale)
    settings = handle.result.settings
    provenance = {
        "tool": "LoRA-X for ComfyUI", "source_adapter": handle.adapter.name, "adapter_kind": handle.adapter.kind,
        "target_model": handle.target_kind, "rank": settings.rank, "threshold": settings.threshold,
        "mode": settings.mode, "copy_below": settings.copy_below, "strength_baked": scale,
        "layers": handle.result.counts(), "text_encoder_skipped": len(handle.skipped_text_encoder),
    }
    save_kohya_lora(path, deltas, base_model_version=handle.base_model_version, architecture=handle.architecture,
                    provenance=provenance)
    return len(deltas)
