"""LoRA to LoRA-X: turn an ordinary adapter into a LoRA-X adapter on its source model, without data."""

from __future__ import annotations

import json

import folder_paths

from lorax.conversion import conversion_summary, convert_deltas
from lorax.errors import LoraxError
from lorax.lorax_adapter import save_lorax
from lorax.transfer import DEFAULT_RANK

from . import bridge
from .api import CATEGORY, Adapter, io, output
from .handles import AdapterHandle
from .runtime import get_engine
from .save_node import next_free_path


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


class LoraxConvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraxConvert",
            display_name="LoRA to LoRA-X",
            category=CATEGORY,
            description=("Converts an ordinary LoRA into a LoRA-X adapter on its source model, without data: each "
                         "layer's change is reduced to r numbers, the changes of the source's top-r singular values. "
                         "Reports per layer how much of the LoRA survives (a generic LoRA can lose most of it)."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model the LoRA was trained on (its source)."),
                Adapter.Input("adapter", tooltip="An ordinary LoRA from LoRA-X Load."),
                io.Int.Input("rank", default=DEFAULT_RANK, min=1, max=4096,
                             tooltip="r: singular values adapted per layer (capped at the layer's rank)."),
                io.String.Input("filename_prefix", default="lorax/converted",
                                tooltip="Name inside ComfyUI's loras folder; a counter is added."),
            ],
            outputs=[
                output(Adapter, "adapter", "The LoRA-X adapter (also saved into the loras folder).",
                       id="lorax_adapter"),
                output(io.String, "report", "Per-layer energy kept, as text."),
                output(io.String, "json", "Per-layer rows as JSON (key, module, rank, kept, residual)."),
            ],
        )

    @classmethod
    def execute(cls, model, adapter, rank, filename_prefix) -> io.NodeOutput:
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
        return io.NodeOutput(handle, text, json.dumps(rows), ui={"text": [text]})
