"""LoRA-X Load: apply an adapter (LoRA-X or ordinary) to the model it was made for."""

from __future__ import annotations

import folder_paths

from . import bridge
from .api import CATEGORY, Adapter, io, output
from .handles import AdapterHandle
from .runtime import get_engine


class LoraxLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraxLoad",
            display_name="LoRA-X Load",
            category=CATEGORY,
            description=("Applies an adapter to its own source model and hands the adapter on to LoRA-X Transfer. "
                         "Reads LoRA-X files (singular-value adapters) and every ordinary LoRA format ComfyUI reads "
                         "(LoRA, LoCon, LoHa, LoKr, DoRA…)."),
            inputs=[
                io.Model.Input("model", tooltip="The model the adapter was trained on (its source checkpoint)."),
                io.Combo.Input("adapter_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA-X or ordinary LoRA file from ComfyUI's 'loras' folder."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly to apply the adapter (1 = as trained; 0 = off)."),
            ],
            outputs=[
                output(io.Model, "model", "A patched clone of the input model (the input is never modified).",
                       id="patched_model"),
                output(Adapter, "adapter", "The adapter, for LoRA-X Transfer and LoRA to LoRA-X."),
            ],
        )

    @classmethod
    def execute(cls, model, adapter_name, strength) -> io.NodeOutput:
        handle = AdapterHandle.open(adapter_name, folder_paths.get_full_path("loras", adapter_name))
        if handle.kind == "lorax":
            deltas = handle.deltas_for(model, get_engine())
            patched = bridge.patched_clone(model, deltas.deltas, strength)
        else:
            patched = bridge.host_patched_clone(model, handle.content, strength, path=handle.path)
        return io.NodeOutput(patched, handle)
