"""LoRA-X Load: apply an adapter (LoRA-X or ordinary) to the model it was made for."""

from __future__ import annotations

import folder_paths

from . import bridge
from .handles import AdapterHandle
from .runtime import get_engine

CATEGORY = "loaders/LoRA-X"


class LoraxLoad:
    DESCRIPTION = ("Applies an adapter to its own source model and hands the adapter on to LoRA-X Transfer. "
                   "Reads LoRA-X files (singular-value adapters) and every ordinary LoRA format ComfyUI reads "
                   "(LoRA, LoCon, LoHa, LoKr, DoRA…).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "LORAX_ADAPTER")
    RETURN_NAMES = ("model", "adapter")
    OUTPUT_TOOLTIPS = ("A patched clone of the input model (the input is never modified).",
                       "The adapter, for LoRA-X Transfer and LoRA to LoRA-X.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the adapter was trained on (its source checkpoint)."}),
            "adapter_name": (folder_paths.get_filename_list("loras"),
                             {"tooltip": "A LoRA-X or ordinary LoRA file from ComfyUI's 'loras' folder."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "How strongly to apply the adapter (1 = as trained; 0 = off)."}),
        }}

    def load(self, model, adapter_name, strength):
        handle = AdapterHandle.open(adapter_name, folder_paths.get_full_path("loras", adapter_name))
        if handle.kind == "lorax":
            deltas = handle.deltas_for(model, get_engine())
            patched = bridge.patched_clone(model, deltas.deltas, strength)
        else:
            patched = bridge.host_patched_clone(model, handle.content, strength, path=handle.path)
        return (patched, handle)
