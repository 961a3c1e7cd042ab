"""LoRA-X Transfer: move an adapter from its source checkpoint onto another checkpoint."""

from __future__ import annotations

import json

from lorax.report import ui_payload
from lorax.transfer import DEFAULT_MODE, MODES, DEFAULT_RANK, DEFAULT_THRESHOLD, SHAPE_RULES, TransferSettings

from . import bridge
from .api import CATEGORY, Adapter, Transfer, io, output
from .handles import AdapterHandle
from .plot import plot_rows
from .runtime import get_engine, progress_bar
from .transfer_job import layer_map_inputs, parse_layer_map_json, run_transfer


class LoraxTransfer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraxTransfer",
            display_name="LoRA-X Transfer",
            category=CATEGORY,
            description=("Moves an adapter trained on the source checkpoint onto the target checkpoint without data "
                         "or training: each layer's change is copied where the target layer barely moved and rotated into "
                         "the target's principal subspaces where it moved more (LoRA-X, ICLR 2025, and the pack's own "
                         "measurements); layers whose subspaces differ too much are left out."),
            inputs=[
                io.Model.Input("source_model", tooltip="The checkpoint the adapter was trained on."),
                io.Model.Input("target_model", tooltip="The checkpoint to move the adapter to."),
                Adapter.Input("adapter", tooltip="From LoRA-X Load (LoRA-X or ordinary LoRA file)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the transferred adapter on the target."),
                io.Int.Input("rank", default=DEFAULT_RANK, min=1, max=4096,
                             tooltip="k: how many of the target's singular directions receive the change (capped "
                                     "at half each layer's rank; LoRA-X adapters use their own r)."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="Minimum chance-normalised similarity Φ̂ (left and right) for a layer to be "
                                       "transferred; 0 transfers every layer."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULT_MODE, tooltip=(
                    "auto (default): copy each layer's change as it is where the target layer moved by at most 50 % "
                    "of its norm (no SVD), rotate it into the target's subspaces where it moved more — measured on "
                    "trained models to keep as much of a LoRA as the stock loader on fine-tunes and more on distilled "
                    "students. copy: always as it is, along the layer map. transport: always rotated. prolora_cross, "
                    "prolora (the default up to 0.2.0), lorax (the paper's): projections, which lose most of an "
                    "ordinary LoRA's effect.")),
                io.Boolean.Input("exact", default=False,
                                 tooltip="Full float64 SVD instead of the fast Gram route (slower; results agree to "
                                         "~1e-10)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The target's text encoder, for adapters that also change it."),
                io.Clip.Input("source_clip", optional=True,
                              tooltip="The source's text encoder (defaults to the target's)."),
                io.Combo.Input("shape_rule", options=list(SHAPE_RULES), optional=True,
                               tooltip="Layers whose shapes differ: skip them, or pair singular directions by index "
                                       "(the paper's rule)."),
                *layer_map_inputs(),
                io.Boolean.Input("cross_attention_kv", default=True, optional=True, tooltip=(
                    "Transfer the cross-attention to_k/to_v layers, which read the text encoder's features. Turn "
                    "off when the two models use different text encoders (e.g. SD1.5 → SDXL).")),
            ],
            outputs=[
                output(io.Model, "model", "A patched clone of the target model."),
                output(io.Clip, "clip", "A patched clone of the CLIP input (None when no CLIP is connected).",
                       id="patched_clip"),
                output(Transfer, "transfer", "The transferred adapter, for LoRA-X Save."),
                output(io.String, "report", "Per-layer decisions as text."),
                output(io.Image, "plot", "Φ per layer as an image."),
                output(io.String, "json", "Per-layer rows as JSON."),
            ],
        )

    @classmethod
    def execute(cls, source_model, target_model, adapter: AdapterHandle, strength, rank, threshold, mode, exact,
                clip=None, source_clip=None, shape_rule="skip", layer_map="similarity", layer_map_json="",
                cross_attention_kv=True) -> io.NodeOutput:
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
        # text + the per-block view web/lorax.js draws, < 200 KB
        ui = ui_payload(handle.rows, threshold=threshold, title=handle.title, text=handle.report,
                        verdict=handle.verdict)
        return io.NodeOutput(model_out, clip_out, handle, handle.report, image, json.dumps(handle.rows), ui=ui)
