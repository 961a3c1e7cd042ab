"""The similarity plot as a ComfyUI ``IMAGE``: one bar of Φ per layer, blocks in model order.

Drawn with numpy + Pillow (both ComfyUI requirements). Each bar is Φ on a 0–1 scale; a short
white tick on each bar marks the Φ that layer needs to pass the threshold (the threshold is on
Φ̂, so in Φ it sits at ``chance + threshold·(1 − chance)``, different per layer width). Bars are
green when transferred, red when skipped for low similarity, grey otherwise (missing, shape,
not compared); skipped layers also get a red mark under the axis.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lorax.report import PASSES, block_of, block_sort_key, short_key

WIDTH, HEIGHT = 1024, 384
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 48, 16, 28, 56
COLORS = {"transferred": (64, 178, 96), "low": (214, 72, 72), "other": (140, 140, 140), "compared": (80, 140, 220)}


def _drawable(text: str) -> str:
    """Pillow's default font has no Greek letters or arrows."""
    return text.replace("→", "->").replace("Φ̂", "phi-hat").replace("Φ", "phi")


def _color(row: Mapping) -> tuple[int, int, int]:
    decision = row.get("decision")
    if decision is None:
        return COLORS["compared"]
    if decision in ("transferred", PASSES):
        return COLORS["transferred"]
    if "similarity" in decision:
        return COLORS["low"]
    return COLORS["other"]


def ordered(rows: Sequence[Mapping]) -> list[Mapping]:
    return sorted(rows, key=lambda r: (block_sort_key(block_of(r["key"])), short_key(r["key"])))


def plot_rows(rows: Sequence[Mapping], threshold: float | None, title: str = "") -> torch.Tensor:
    """``[1, H, W, 3]`` float image in [0, 1]."""
    img = Image.new("RGB", (WIDTH, HEIGHT), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1 = MARGIN_L, WIDTH - MARGIN_R
    y0, y1 = MARGIN_T, HEIGHT - MARGIN_B  # y1 is Φ = 0, y0 is Φ = 1
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = round(y1 - v * (y1 - y0))
        draw.line([(x0, y), (x1, y)], fill=(60, 60, 66))
        draw.text((4, y - 6), f"{v:.2f}", fill=(200, 200, 200), font=font)
    draw.text((x0, 6), _drawable(title or "Subspace similarity Φ per layer"), fill=(230, 230, 230), font=font)
    rows = ordered(rows)
    n = max(1, len(rows))
    slot = (x1 - x0) / n
    gap = 1 if slot >= 3 else 0
    last_block = None
    for i, r in enumerate(rows):
        left = x0 + i * slot
        right = max(left + 1, x0 + (i + 1) * slot - gap)
        block = block_of(r["key"])
        if block != last_block:
            draw.line([(left, y1 + 2), (left, y1 + 8)], fill=(200, 200, 200))
            if slot * 6 > 40 or i == 0 or i % max(1, int(60 / max(slot, 1e-9))) == 0:
                draw.text((left + 1, y1 + 10), block.replace("_blocks", "").replace("_block", ""),
                          fill=(180, 180, 180), font=font)
            last_block = block
        phi = r.get("phi")
        if phi is not None:
            top = y1 - float(np.clip(phi, 0, 1)) * (y1 - y0)
            draw.rectangle([left, top, right, y1], fill=_color(r))
            chance = r.get("chance")
            if threshold is not None and chance is not None:
                need = chance + threshold * (1 - chance)
                ty = round(y1 - need * (y1 - y0))
                draw.line([(left, ty), (right, ty)], fill=(255, 255, 255))
        if r.get("decision") not in (None, "transferred", PASSES):
            draw.rectangle([left, y1 + 30, right, y1 + 36], fill=COLORS["low"])
    legend = "green: transferred   red: skipped (low Φ̂)   grey: other   white tick: Φ needed to pass"
    draw.text((x0, HEIGHT - 14), _drawable(legend), fill=(200, 200, 200), font=font)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
