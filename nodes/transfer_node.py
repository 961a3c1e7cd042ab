"""LoRA-X Transfer: move an adapter from its source checkpoint onto another checkpoint."""

from __future__ import annotations

import json

from lorax.projection import MODES
from lorax.transfer import DEFAULT_MODE, DEFAULT_RANK, DEFAULT_THRESHOLD, SHAPE_RULES, TransferSettings

from . import bridge
from .handles import AdapterHandle
from .plot import plot_rows
from .runtime import get_engine, progress_bar
from .transfer_job import LAYER_MAP_INPUTS, parse_layer_map_json, run_transfer

CATEGORY = "loaders/LoRA-X"


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
                "mode": (list(MODES), {"default": DEFAULT_MODE, "tooltip": (
                    "prolora (default): the paper's projection plus the part of the change outside both models' "
                    "subspaces — measured to keep more of ordinary LoRAs. lorax: the paper's projection onto the "
                    "target's top-k subspaces only. Identical for LoRA-X adapters.")}),
                "exact": ("BOOLEAN", {"default": False,
                                      "tooltip": "Full float64 SVD instead of the fast Gram route (slower; results "
                                                 "agree to ~1e-10)."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The target's text encoder, for adapters that also change it."}),
                "source_clip": ("CLIP", {"tooltip": "The source's text encoder (defaults to the target's)."}),
                "shape_rule": (list(SHAPE_RULES), {"tooltip": "Layers whose shapes differ: skip them, or pair "
                                                              "singular directions by index (the paper's rule)."}),
                **LAYER_MAP_INPUTS,
                "cross_attention_kv": ("BOOLEAN", {"default": True, "tooltip": (
                    "Transfer the cross-attention to_k/to_v layers, which read the text encoder's features. Turn "
                    "off when the two models use different text encoders (e.g. SD1.5 → SDXL).")}),
            },
        }

    def transfer(self, source_model, target_model, adapter: AdapterHandle, strength, rank, threshold, mode, exact,
                 clip=None, source_clip=None, shape_rule="skip", layer_map="similarity", layer_map_json="",
                 cross_attention_kv=True):
        settings = TransferSettings(rank=rank, threshold=threshold, mode=mode, shape_rule=shape_rule,
                                    cross_attention_kv=cross_attention_kv)
        handle = run_transfer(source_model, target_model, adapter, settings, get_engine(exact), strength=strength,
                              clip=clip, source_clip=source_clip, progress=progress_bar(1), layer_map_mode=layer_map,
                              user_map=parse_layer_map_json(layer_map_json))
        model_out = bridge.patched_clone(target_model, handle.result.deltas, strength)
        clip_out = None
        if clip is not None:
            clip_out = clip.clone()
            if handle.clip_result is not None:
                clip_out.add_patches({k: bridge.lora_patch(d) for k, d in handle.clip_result.deltas.items()}, strength)
        image = plot_rows(handle.rows, threshold, handle.title)
        from lorax.report import ui_payload  # text + the per-block view web/lorax.js draws, < 200 KB
        return {"ui": ui_payload(handle.rows, threshold=threshold, title=handle.title, text=handle.report,
                                 verdict=handle.verdict),
                "result": (model_out, clip_out, handle, handle.report, image, json.dumps(handle.rows))}
