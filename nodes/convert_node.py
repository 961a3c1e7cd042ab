"""LoRA to LoRA-X: turn an ordinary adapter into a LoRA-X adapter on its source model, without data."""

from __future__ import annotations

import json

import folder_paths

from lorax.conversion import conversion_summary, convert_deltas
from lorax.errors import LoraxError
from lorax.lorax_adapter import save_lorax
from lorax.transfer import DEFAULT_RANK

from . import bridge
from .handles import AdapterHandle
from .runtime import get_engine
from .save_node import next_free_path

CATEGORY = "loaders/LoRA-X"


def convert_adapter(model, adapter: AdapterHandle, rank: int, engine):
    """``(LoraxAdapter, per-layer rows, summary)`` for an ordinary adapter read against ``model``."""
    if adapter.kind == "lorax":
        raise LoraxError("this adapter is already a LoRA-X adapter; nothing to convert", path=adapter.path)
    if rank < 1:
        raise LoraxError(f"rank must be a positive integer, got {rank}")
    deltas = adapter.deltas_for(model, engine)
    key_map = bridge.adapter_key_map(model)
    # Slices of fused weights keep the adapter's own (diffusers) module names, which the key map sends there.
    names = {**bridge.kohya_names(key_map, internal=True), **bridge.slice_module_names(key_map)}
    version, _ = bridge.base_model_names(model)
    converted, layers = convert_deltas(deltas.deltas, names, bridge.PatcherWeights(model), rank, engine,
                                       metadata={"lorax_source": bridge.model_kind(model),
                                                 "lorax_converted_from": adapter.name,
                                                 "ss_base_model_version": version})
    return converted, [l.row() for l in layers], conversion_summary(layers)


class LoraxConvert:
    DESCRIPTION = ("Converts an ordinary LoRA into a LoRA-X adapter on its source model, without data: each layer's "
                   "change is reduced to r numbers, the changes of the source's top-r singular values. Reports per "
                   "layer how much of the LoRA survives (a generic LoRA can lose most of it).")
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    OUTPUT_NODE = True
    RETURN_TYPES = ("LORAX_ADAPTER", "STRING", "STRING")
    RETURN_NAMES = ("adapter", "report", "json")
    OUTPUT_TOOLTIPS = ("The LoRA-X adapter (also saved into the loras folder).", "Per-layer energy kept, as text.",
                       "Per-layer rows as JSON (key, module, rank, kept, residual).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the LoRA was trained on (its source)."}),
            "adapter": ("LORAX_ADAPTER", {"tooltip": "An ordinary LoRA from LoRA-X Load."}),
            "rank": ("INT", {"default": DEFAULT_RANK, "min": 1, "max": 4096,
                             "tooltip": "r: singular values adapted per layer (capped at the layer's rank)."}),
            "filename_prefix": ("STRING", {"default": "lorax/converted",
                                           "tooltip": "Name inside ComfyUI's loras folder; a counter is added."}),
        }}

    def convert(self, model, adapter, rank, filename_prefix):
        converted, rows, summary = convert_adapter(model, adapter, rank, get_engine())
        folder = folder_paths.get_folder_paths("loras")[0]
        path = next_free_path(folder, filename_prefix)
        save_lorax(path, converted)
        lines = [f"LoRA to LoRA-X: {adapter.description} on {bridge.model_kind(model)}", summary,
                 f"saved to loras/{path[len(folder) + 1:]} ({converted.parameter_count} parameters)", "",
                 f"{'layer':<72} {'r':>4} {'kept':>7}"]
        lines += [f"{r['module']:<72} {r['rank']:>4} {100 * r['kept']:>6.1f}%" for r in rows]
        text = "\n".join(lines)
        handle = AdapterHandle(name=path[len(folder) + 1:], path=path, kind="lorax", content=converted)
        return {"ui": {"text": [text]}, "result": (handle, text, json.dumps(rows))}
