"""Subspace Similarity Report: how alike two checkpoints are, layer by layer."""

from __future__ import annotations

import json
import re

from lorax.errors import LoraxError
from lorax.report import PASSES, text_report
from lorax.transfer import DEFAULT_RANK, DEFAULT_THRESHOLD, similarity_table

from .bridge import PatcherWeights, model_kind
from .plot import plot_rows
from .runtime import get_engine, progress_bar
from .transfer_job import check_distinct

CATEGORY = "loaders/LoRA-X"
LAYER_SETS = ("adapted by LoRAs (attention, feed-forward, proj)", "all linear and conv weights")
# UNet attention / feed-forward / proj layers; every linear layer inside a DiT's blocks (Flux's double and
# single blocks, SD3's joint blocks: attention, MLP and modulation), which is what LoRA trainers adapt there.
_ADAPTED = re.compile(r"(transformer_blocks|\.attn|_attn|\.ff\.|\.mlp|proj_in|proj_out|\.qkv|linear[12]|\.to_[qkv]"
                      r"|(double|single|joint)_blocks\.)")


def compared_keys(source: PatcherWeights, target: PatcherWeights, layer_set: str) -> list[str]:
    keys = []
    for key in source.keys():
        shape = source.shape(key)
        if not key.endswith(".weight") or shape is None or len(shape) < 2 or target.shape(key) != shape:
            continue
        if layer_set == LAYER_SETS[0] and not _ADAPTED.search(key):
            continue
        keys.append(key)
    return keys


class LoraxSimilarityReport:
    DESCRIPTION = ("Compares two checkpoints layer by layer with LoRA-X's subspace similarity Φ "
                   "(1 = same principal subspaces). Shows which layers an adapter can be moved across.")
    CATEGORY = CATEGORY
    FUNCTION = "report"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("report", "plot", "json")
    OUTPUT_TOOLTIPS = ("The report as text.", "Φ per layer as an image (blocks in order).",
                       "The per-layer rows as JSON (key, phi, phi_right, chance, phi_hat, shapes).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source_model": ("MODEL", {"tooltip": "The model an adapter was trained on."}),
            "target_model": ("MODEL", {"tooltip": "The model the adapter would be moved to."}),
            "rank": ("INT", {"default": DEFAULT_RANK, "min": 1, "max": 4096,
                             "tooltip": "Top-k singular directions compared (capped at half each layer's rank)."}),
            "layers": (list(LAYER_SETS), {"tooltip": "Which weights to compare."}),
            "threshold": ("FLOAT", {"default": DEFAULT_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Drawn on the plot: the chance-normalised similarity Φ̂ a layer needs "
                                               "for LoRA-X Transfer to move it."}),
        }}

    def report(self, source_model, target_model, rank, layers, threshold):
        rows, text, title = run_similarity(source_model, target_model, rank=rank, layer_set=layers,
                                           threshold=threshold, engine=get_engine())
        image = plot_rows(rows, threshold, title)
        from lorax.report import ui_payload  # text + the per-block view web/lorax.js draws, < 200 KB
        return {"ui": ui_payload(rows, threshold=threshold, title=title, text=text),
                "result": (text, image, json.dumps(rows))}


def run_similarity(source_model, target_model, *, rank: int, layer_set: str, threshold: float, engine,
                   progress=None) -> tuple[list[dict], str, str]:
    """Per-layer Φ rows of two models, the text report and its title (shared with the CLI)."""
    check_distinct(source_model, target_model)
    if not 0.0 <= threshold <= 1.0:
        raise LoraxError(f"threshold must lie in [0, 1], got {threshold}")
    source, target = PatcherWeights(source_model), PatcherWeights(target_model)
    keys = compared_keys(source, target, layer_set)
    if not keys:
        raise LoraxError(f"the source ({model_kind(source_model)}) and target ({model_kind(target_model)}) "
                         "models share no weight of equal shape to compare")
    rows = similarity_table(source, target, keys, engine, rank=rank, progress=progress or progress_bar(len(keys)))
    for r in rows:
        r["decision"] = PASSES if min(r["phi_hat"], r["phi_hat_right"]) >= threshold else \
            "skipped: similarity below threshold"
    title = f"Subspace similarity: {model_kind(source_model)} → {model_kind(target_model)}, rank {rank}"
    text = text_report(rows, title=title, threshold=threshold)
    return rows, text, title
