"""LoRA-X Transfer: move an adapter from its source checkpoint onto another checkpoint."""

from __future__ import annotations

import json

from lorax.errors import LoraxError
from lorax.projection import MODES
from lorax.report import text_report
from lorax.transfer import (DEFAULT_RANK, DEFAULT_THRESHOLD, SHAPE_RULES, TransferSettings,
                            transfer_deltas)

from . import bridge
from .handles import AdapterHandle, TransferHandle
from .plot import plot_rows
from .runtime import get_engine, progress_bar
from .similarity_node import check_distinct

CATEGORY = "loaders/LoRA-X"
TE_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "clip_")


class LoraxTransfer:
    DESCRIPTION = ("Moves an adapter trained on the source checkpoint onto the target checkpoint without data "
                   "or training (LoRA-X, ICLR 2025): each layer's change is projected into the target's "
                   "principal subspaces, and layers whose subspaces differ too much are left out.")
    CATEGORY = CATEGORY
    FUNCTION = "transfer"
    RETURN_TYPES = ("MODEL", "CLIP", "LORAX_TRANSFER", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("model", "clip", "transfer", "report", "plot", "json")
    OUTPUT_TOOLTIPS = ("A patched clone of the target model.",
                       "A patched clone of the CLIP input (None when no CLIP is connected).",
                       "The transferred adapter, for LoRA-X Save.",
                       "Per-layer decisions as text.", "Φ per layer as an image.", "Per-layer rows as JSON.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "source_model": ("MODEL", {"tooltip": "The checkpoint the adapter was trained on."}),
                "target_model": ("MODEL", {"tooltip": "The checkpoint to move the adapter to."}),
                "adapter": ("LORAX_ADAPTER", {"tooltip": "From LoRA-X Load (LoRA-X or ordinary LoRA file)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Strength of the transferred adapter on the target."}),
                "rank": ("INT", {"default": DEFAULT_RANK, "min": 1, "max": 4096,
                                 "tooltip": "k: how many of the target's singular directions receive the change "
                                            "(capped at half each layer's rank; LoRA-X adapters use their own r)."}),
                "threshold": ("FLOAT", {"default": DEFAULT_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Minimum chance-normalised similarity Φ̂ (left and right) for a "
                                                   "layer to be transferred; 0 transfers every layer."}),
                "mode": (list(MODES), {"tooltip": "lorax: the paper's projection onto the target's top-k subspace. "
                                                 "prolora: also carries the part outside both subspaces."}),
                "exact": ("BOOLEAN", {"default": False,
                                      "tooltip": "Full float64 SVD instead of the fast Gram route (slower; results "
                                                 "agree to ~1e-10)."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The target's text encoder, for adapters that also change it."}),
                "source_clip": ("CLIP", {"tooltip": "The source's text encoder (defaults to the target's)."}),
                "shape_rule": (list(SHAPE_RULES), {"tooltip": "Layers whose shapes differ: skip them, or pair "
                                                              "singular directions by index (the paper's rule)."}),
            },
        }

    def transfer(self, source_model, target_model, adapter: AdapterHandle, strength, rank, threshold, mode, exact,
                 clip=None, source_clip=None, shape_rule="skip"):
        check_distinct(source_model, target_model)
        settings = TransferSettings(rank=rank, threshold=threshold, mode=mode, shape_rule=shape_rule)
        engine = get_engine(exact)
        deltas = adapter.deltas_for(source_model, engine, clip=(source_clip or clip))
        unet_part, te_part = bridge.split_by_owner(deltas.deltas, source_model)
        progress = progress_bar(len(deltas.deltas))
        result = transfer_deltas(unet_part, bridge.PatcherWeights(source_model), bridge.PatcherWeights(target_model),
                                 settings, engine, adapter_ranks=deltas.adapter_ranks, progress=progress)
        clip_result, clip_out = None, None
        if clip is not None and te_part:
            src_te = bridge.PatcherWeights((source_clip or clip).patcher)
            clip_result = transfer_deltas(te_part, src_te, bridge.PatcherWeights(clip.patcher), settings, engine,
                                          adapter_ranks=deltas.adapter_ranks)
        if clip is not None:
            clip_out = clip.clone()
            if clip_result is not None:
                clip_out.add_patches({k: bridge.lora_patch(d) for k, d in clip_result.deltas.items()}, strength)
        model_out = bridge.patched_clone(target_model, result.deltas, strength)

        te_skipped = [m for m in deltas.unmapped if m.startswith(TE_PREFIXES)]
        other_unmapped = [m for m in deltas.unmapped if m not in te_skipped]
        rows = [layer.row() for layer in result.layers]
        if clip_result is not None:
            rows += [layer.row() for layer in clip_result.layers]
        for module in te_skipped:
            rows.append({"key": module, "decision": "skipped: text encoder (no CLIP connected)", "phi": None})
        for key, why in deltas.unsupported.items():
            rows.append({"key": key, "decision": f"skipped: {why}", "phi": None})
        notes = [result.summary()]
        if te_skipped:
            notes.append(f"{len(te_skipped)} text-encoder modules skipped: connect the target's CLIP to transfer them.")
        if other_unmapped:
            notes.append(f"{len(other_unmapped)} adapter modules match no layer of the model "
                         f"(first: {other_unmapped[0]}).")
        if clip is not None and source_clip is None and te_part:
            notes.append("No source CLIP connected: text-encoder layers were compared with the target's own.")
        title = (f"LoRA-X Transfer of {adapter.description}: {bridge.model_kind(source_model)} → "
                 f"{bridge.model_kind(target_model)}, mode {mode}")
        text = text_report(rows, title=title, threshold=threshold, notes=notes)
        image = plot_rows(rows, threshold, title)
        names = bridge.kohya_names(bridge.adapter_key_map(target_model, clip))
        version, arch = bridge.base_model_names(target_model)
        handle = TransferHandle(adapter=adapter, result=result, clip_result=clip_result, strength=strength,
                                kohya_names=names, base_model_version=version, architecture=arch,
                                target_kind=bridge.model_kind(target_model), skipped_text_encoder=te_skipped)
        return {"ui": {"text": [text]}, "result": (model_out, clip_out, handle, text, image, json.dumps(rows))}
