"""Subspace Similarity Report: how alike two checkpoints are, layer by layer."""

from __future__ import annotations

import json
import re

from lorax.errors import LoraxError
from lorax.layer_map import LayerMap, build_layer_map
from lorax.report import PASSES, text_report, ui_payload
from lorax.transfer import DEFAULT_RANK, DEFAULT_THRESHOLD, similarity_scorer, similarity_table

from .api import CATEGORY, io, output
from .bridge import PatcherWeights, model_kind
from .plot import plot_rows
from .runtime import get_engine, progress_bar
from .transfer_job import check_distinct, layer_map_inputs, parse_layer_map_json

LAYER_SETS = ("adapted by LoRAs (attention, feed-forward, proj)", "all linear and conv weights")
# UNet attention / feed-forward / proj layers; every linear layer inside a DiT's blocks (Flux's double and
# single blocks, SD3's joint blocks: attention, MLP and modulation), which is what LoRA trainers adapt there.
_ADAPTED = re.compile(r"(transformer_blocks|\.attn|_attn|\.ff\.|\.mlp|proj_in|proj_out|\.qkv|linear[12]|\.to_[qkv]"
                      r"|(double|single|joint)_blocks\.)")


def layer_shapes(weights: PatcherWeights, layer_set: str) -> dict[str, tuple]:
    """Shapes of the matrix weights of ``layer_set`` in one model."""
    out = {}
    for key in weights.keys():
        shape = weights.shape(key)
        if not key.endswith(".weight") or shape is None or len(shape) < 2:
            continue
        if layer_set == LAYER_SETS[0] and not _ADAPTED.search(key):
            continue
        out[key] = shape
    return out


def compared_pairs(source: PatcherWeights, target: PatcherWeights, layer_set: str, engine, *, rank: int,
                   layer_map_mode: str = "similarity", user_map=None) -> tuple[list[tuple[str, str]], LayerMap | None]:
    """(source key, target key) pairs to compare: equal names and shapes, or a layer map's pairs."""
    s_shapes, t_shapes = layer_shapes(source, layer_set), layer_shapes(target, layer_set)
    if layer_map_mode == "name" and not user_map:
        return [(k, k) for k, shape in s_shapes.items() if t_shapes.get(k) == shape], None
    lmap = build_layer_map(s_shapes, t_shapes, mode=layer_map_mode, user_map=user_map,
                           scorer=similarity_scorer(source, target, engine, rank))
    return [(s, t) for s, t in lmap.pairs() if s_shapes[s] == t_shapes[t]], lmap


class LoraxSimilarityReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraxSimilarityReport",
            display_name="Subspace Similarity Report",
            category=CATEGORY,
            description=("Compares two checkpoints layer by layer with LoRA-X's subspace similarity Φ "
                         "(1 = same principal subspaces). Shows which layers an adapter can be moved across."),
            is_output_node=True,
            inputs=[
                io.Model.Input("source_model", tooltip="The model an adapter was trained on."),
                io.Model.Input("target_model", tooltip="The model the adapter would be moved to."),
                io.Int.Input("rank", default=DEFAULT_RANK, min=1, max=4096,
                             tooltip="Top-k singular directions compared (capped at half each layer's rank)."),
                io.Combo.Input("layers", options=list(LAYER_SETS), tooltip="Which weights to compare."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="Drawn on the plot: the chance-normalised similarity Φ̂ a layer needs for "
                                       "LoRA-X Transfer to move it."),
                *layer_map_inputs(),
            ],
            outputs=[
                output(io.String, "report", "The report as text."),
                output(io.Image, "plot", "Φ per layer as an image (blocks in order)."),
                output(io.String, "json",
                       "The per-layer rows as JSON (key, phi, phi_right, chance, phi_hat, shapes)."),
            ],
        )

    @classmethod
    def execute(cls, source_model, target_model, rank, layers, threshold, layer_map="similarity",
                layer_map_json="") -> io.NodeOutput:
        rows, text, title = run_similarity(source_model, target_model, rank=rank, layer_set=layers,
                                           threshold=threshold, engine=get_engine(), layer_map_mode=layer_map,
                                           user_map=parse_layer_map_json(layer_map_json))
        image = plot_rows(rows, threshold, title)
        # text + the per-block view web/lorax.js draws, < 200 KB
        return io.NodeOutput(text, image, json.dumps(rows), ui=ui_payload(rows, threshold=threshold, title=title,
                                                                          text=text))


def run_similarity(source_model, target_model, *, rank: int, layer_set: str, threshold: float, engine,
                   progress=None, layer_map_mode: str = "similarity",
                   user_map=None) -> tuple[list[dict], str, str]:
    """Per-layer Φ rows of two models, the text report and its title (shared with the CLI).

    With ``layer_map_mode="similarity"`` (or a ``user_map``) each target layer is compared with the
    source layer the layer map pairs it with, so a model with blocks removed is compared block for
    block with what it kept; ``"name"`` compares equal keys only.
    """
    check_distinct(source_model, target_model)
    if not 0.0 <= threshold <= 1.0:
        raise LoraxError(f"threshold must lie in [0, 1], got {threshold}")
    source, target = PatcherWeights(source_model), PatcherWeights(target_model)
    cache_before = engine.cache_counters()
    pairs, lmap = compared_pairs(source, target, layer_set, engine, rank=rank, layer_map_mode=layer_map_mode,
                                 user_map=user_map)
    if not pairs:
        raise LoraxError(f"the source ({model_kind(source_model)}) and target ({model_kind(target_model)}) "
                         "models share no weight of equal shape to compare")
    rows = similarity_table(source, target, pairs, engine, rank=rank, progress=progress or progress_bar(len(pairs)))
    for r in rows:
        r["decision"] = PASSES if min(r["phi_hat"], r["phi_hat_right"]) >= threshold else \
            "skipped: similarity below threshold"
    title = f"Subspace similarity: {model_kind(source_model)} → {model_kind(target_model)}, rank {rank}"
    notes = [lmap.summary()] if lmap is not None and any(m.how != "name" for m in lmap.matches.values()) else []
    notes.append(engine.cache_note(cache_before))
    text = text_report(rows, title=title, threshold=threshold, notes=notes)
    return rows, text, title
