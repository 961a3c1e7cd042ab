"""LoRA-X Transfer (two experts): one adapter onto Wan 2.2 A14B's high-noise and low-noise experts,
the source decomposed once.

Wan 2.2 A14B samples with two diffusion models of the Wan 2.1 14B shape, the high-noise expert for
the first steps and the low-noise expert for the rest, and a LoRA goes on both. Two LoRA-X Transfer
nodes would each read the source's factors again: from the engine's memo when they fit in it
(256 MiB), from the SVD cache when it is on, and otherwise by decomposing the source a second time
— a LoRA on every linear layer of Wan 14B needs about 6 GB of source factors, so without the cache
the second node repeats the whole source half of the work. This node runs both transfers with the
source's factors held in memory in between (:meth:`lorax.engine.SVDEngine.holding`), so they are
decomposed or read once, whatever the cache; each expert then gets its own Φ, decisions, report and
patched clone. The settings and their defaults are LoRA-X Transfer's own inputs, reused as they are.
"""

from __future__ import annotations

import torch

from lorax.transfer import TransferSettings

from . import bridge
from .api import CATEGORY, Transfer, io, output
from .handles import AdapterHandle
from .plot import plot_rows
from .runtime import get_engine, progress_bar
from .transfer_job import parse_layer_map_json, run_transfer
from .transfer_node import LoraxTransfer

EXPERTS = ("high_noise", "low_noise")
#: LoRA-X Transfer's inputs this node takes unchanged (same names, defaults, limits, tooltips).
SHARED_REQUIRED = ("adapter", "rank", "threshold", "mode", "exact")
SHARED_OPTIONAL = ("shape_rule", "layer_map", "layer_map_json", "cross_attention_kv")


def _transfer_inputs(names) -> list:
    by_id = {i.id: i for i in LoraxTransfer.define_schema().inputs}
    return [by_id[name] for name in names]


class LoraxTransferTwoExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraxTransferTwoExperts",
            display_name="LoRA-X Transfer (two experts)",
            category=CATEGORY,
            description=("Moves one adapter onto two targets at once — Wan 2.2 A14B's high-noise and low-noise "
                         "experts — decomposing the source only once: the same transfer as LoRA-X Transfer for "
                         "each expert, with its own report and patched clone."),
            inputs=[
                io.Model.Input("source_model", tooltip="The checkpoint the adapter was trained on (e.g. Wan 2.1 "
                                                       "T2V 14B)."),
                io.Model.Input("high_noise_model", tooltip="The first target: Wan 2.2 A14B's high-noise expert "
                                                           "(any checkpoint of the source's kind works)."),
                io.Model.Input("low_noise_model", tooltip="The second target: Wan 2.2 A14B's low-noise expert."),
                *_transfer_inputs(SHARED_REQUIRED[:1]),
                io.Float.Input("high_noise_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the transferred adapter on the high-noise expert."),
                io.Float.Input("low_noise_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the transferred adapter on the low-noise expert."),
                *_transfer_inputs(SHARED_REQUIRED[1:]),
                *_transfer_inputs(SHARED_OPTIONAL),
            ],
            outputs=[
                output(io.Model, "high_noise_model", "A patched clone of the high-noise expert.",
                       id="patched_high_noise_model"),
                output(io.Model, "low_noise_model", "A patched clone of the low-noise expert.",
                       id="patched_low_noise_model"),
                output(Transfer, "high_noise_transfer", "The adapter transferred to the high-noise expert, for "
                                                        "LoRA-X Save."),
                output(Transfer, "low_noise_transfer", "The adapter transferred to the low-noise expert, for "
                                                       "LoRA-X Save."),
                output(io.String, "high_noise_report", "The high-noise expert's per-layer decisions as text."),
                output(io.String, "low_noise_report", "The low-noise expert's per-layer decisions as text."),
                output(io.Image, "plot", "Φ per layer, the high-noise expert above the low-noise one."),
            ],
        )

    @classmethod
    def execute(cls, source_model, high_noise_model, low_noise_model, adapter: AdapterHandle, high_noise_strength,
                low_noise_strength, rank, threshold, mode, exact, shape_rule="skip", layer_map="similarity",
                layer_map_json="", cross_attention_kv=True) -> io.NodeOutput:
        settings = TransferSettings(rank=rank, threshold=threshold, mode=mode, shape_rule=shape_rule,
                                    cross_attention_kv=cross_attention_kv)
        user_map = parse_layer_map_json(layer_map_json)
        engine = get_engine(exact)
        bar = progress_bar(2)
        targets = {"high_noise": (high_noise_model, high_noise_strength),
                   "low_noise": (low_noise_model, low_noise_strength)}
        handles, decomposed = {}, {}
        # The source's factors stay in memory from the first transfer to the second (module docstring).
        with engine.holding(bridge.PatcherWeights(source_model).origin):
            for i, (expert, (target, strength)) in enumerate(targets.items()):
                before = engine.stats.layers_decomposed
                handles[expert] = run_transfer(
                    source_model, target, adapter, settings, engine, strength=strength,
                    progress=_half(bar, i), layer_map_mode=layer_map, user_map=user_map)
                decomposed[expert] = engine.stats.layers_decomposed - before
        models = [bridge.patched_clone(targets[e][0], handles[e].result.deltas, targets[e][1]) for e in EXPERTS]
        reports = [f"{_label(e)} expert\n{handles[e].report}" for e in EXPERTS]
        plots = [plot_rows(handles[e].rows, threshold, f"{_label(e)} expert: {handles[e].title}") for e in EXPERTS]
        shared = (f"Decomposed {decomposed['high_noise']} layers for the high-noise expert (source and target) and "
                  f"{decomposed['low_noise']} for the low-noise expert (its own layers only: the source's factors "
                  "were reused).")
        text = "\n\n".join([shared, *reports])
        return io.NodeOutput(*models, handles["high_noise"], handles["low_noise"], *reports, _stack(plots),
                             ui={"text": [text]})


def _label(expert: str) -> str:
    return expert.replace("_", "-").capitalize()


def _half(bar, i: int):
    """Progress of transfer ``i`` of two as its half of the node's one bar."""
    def update(done: int, total: int) -> None:
        total = max(1, total)
        bar(i * total + done, 2 * total)

    return update


def _stack(images) -> torch.Tensor:
    """Plots ``[1, H, W, 3]`` one above the other as one image (a narrower one padded on the right with
    its own background, the colour of its corner)."""
    width = max(im.shape[2] for im in images)
    padded = [im if im.shape[2] == width else
              torch.cat([im, im[:, :1, :1].expand(-1, im.shape[1], width - im.shape[2], -1)], dim=2) for im in images]
    return torch.cat(padded, dim=1)
