"""The similarity plot as a ComfyUI ``IMAGE``: the same per-block view the nodes draw in the graph
(``web/lorax.js``), drawn with numpy + Pillow (both ComfyUI requirements).

Blocks in model order (UNet input, middle, output; or a DiT's own blocks), separated by a gap and
labelled underneath with how many of their layers pass. Inside a block, one bar per layer
family (attn1 q/k/v/out, attn2 q/k/v/out, ff, proj_in/out…): its height is the family's median
Φ on a 0–1 scale (with a single layer, that layer's Φ); a dark line marks the family's lowest Φ
when it has several layers. A short white tick on each bar is the Φ its layers need to pass the
threshold (the threshold is on Φ̂, so in Φ it sits at ``chance + threshold·(1 − chance)``,
different per layer width). Bars are green when every layer is transferred (or passes), red when
none is, orange when some are, blue without decisions, grey without a score; a red mark under a
bar means some of its layers were skipped. A family whose layers were all copied as they are (they
barely moved, so the transfer decomposed nothing and there is no Φ) is a full teal bar.

:func:`layout` gives the geometry (bar and block spans in pixels) without drawing anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lorax.report import block_stats, summary_line

MIN_WIDTH, MAX_WIDTH, HEIGHT = 1024, 4096, 440
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 44, 16, 48, 92
BLOCK_GAP = 6
BAR_GAP = 1
MIN_SLOT = 4  # px per bar before the image grows wider (up to MAX_WIDTH)
MARK_TOP, MARK_H = 4, 6  # the skipped mark under a bar: y1 + 4 … y1 + 9
BACKGROUND = (24, 24, 28)
COLORS = {"transferred": (64, 178, 96), "low": (214, 72, 72), "mixed": (232, 150, 40), "other": (140, 140, 140),
          "compared": (80, 140, 220), "copied": (70, 170, 200)}
TICK = (255, 255, 255)
MIN_LINE = (20, 20, 24)


@dataclass
class Bar:
    block: str
    family: str
    x0: int  # first pixel column of the bar
    x1: int  # last pixel column of the bar (inclusive)
    phi_median: float | None
    phi_min: float | None
    phi_needed: float | None
    n: int
    n_transferred: int
    n_skipped: int
    n_copied: int = 0

    @property
    def copied_only(self) -> bool:
        """Every scored-or-not layer of the family was copied as is (no SVD, so no Φ): a full bar."""
        return self.phi_median is None and self.n_copied > 0

    @property
    def color(self) -> tuple[int, int, int]:
        if self.copied_only:
            return COLORS["copied"] if self.n_copied == self.n_transferred == self.n else COLORS["mixed"]
        if self.phi_median is None:
            return COLORS["other"]
        if self.n_transferred + self.n_skipped == 0:
            return COLORS["compared"]
        if self.n_transferred == self.n:
            return COLORS["transferred"]
        if self.n_transferred == 0:
            return COLORS["low"]
        return COLORS["mixed"]


@dataclass
class BlockSpan:
    block: str
    label: str
    x0: int
    x1: int
    n: int
    n_transferred: int
    bars: list[Bar] = field(default_factory=list)


@dataclass
class Layout:
    width: int
    height: int
    y0: int  # the row of Φ = 1
    y1: int  # the row of Φ = 0
    blocks: list[BlockSpan]

    @property
    def bars(self) -> list[Bar]:
        return [b for blk in self.blocks for b in blk.bars]

    def y_of(self, phi: float) -> int:
        return round(self.y1 - float(np.clip(phi, 0.0, 1.0)) * (self.y1 - self.y0))


def layout(rows: Sequence[Mapping], threshold: float | None) -> Layout:
    """Where every block and bar goes (see the module docstring); nothing is drawn."""
    stats = block_stats(rows, threshold)
    n_bars = sum(len(b["families"]) for b in stats)
    gaps = BLOCK_GAP * max(0, len(stats) - 1)
    width = int(np.clip(MARGIN_L + MARGIN_R + gaps + MIN_SLOT * n_bars, MIN_WIDTH, MAX_WIDTH))
    slot = max(1.0, (width - MARGIN_L - MARGIN_R - gaps) / max(1, n_bars))
    gap = BAR_GAP if slot >= 3 else 0
    y0, y1 = MARGIN_T, HEIGHT - MARGIN_B
    x = float(MARGIN_L)
    blocks = []
    for b in stats:
        start = x
        span = BlockSpan(b["block"], b["label"], round(start), 0, b["n"], b["n_transferred"])
        for f in b["families"]:
            left = round(x)
            right = max(left, round(x + slot) - 1 - gap)
            span.bars.append(Bar(b["block"], f["family"], left, right, f["phi_median"], f["phi_min"],
                                 f["phi_needed"], f["n"], f["n_transferred"], f["n_skipped"], f["n_copied"]))
            x += slot
        span.x1 = max(span.x0, round(x) - 1 - gap)
        blocks.append(span)
        x += BLOCK_GAP
    return Layout(width=width, height=HEIGHT, y0=y0, y1=y1, blocks=blocks)


def _drawable(text: str) -> str:
    """Pillow's default font has no Greek letters or arrows."""
    return text.replace("→", "->").replace("Φ̂", "phi-hat").replace("Φ", "phi").replace("≥", ">=").replace("…", "...")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _text_width(font, text: str) -> float:
    try:
        return font.getlength(text)
    except AttributeError:
        return 6 * len(text)


def plot_rows(rows: Sequence[Mapping], threshold: float | None, title: str = "") -> torch.Tensor:
    """``[1, H, W, 3]`` float image in [0, 1] (see the module docstring)."""
    lay = layout(rows, threshold)
    img = Image.new("RGB", (lay.width, lay.height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font, small = _font(12), _font(10)
    x0, x1, y0, y1 = MARGIN_L, lay.width - MARGIN_R, lay.y0, lay.y1
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = lay.y_of(v)
        draw.line([(x0, y), (x1, y)], fill=(60, 60, 66))
        draw.text((4, y - 6), f"{v:.2f}", fill=(200, 200, 200), font=small)
    draw.text((x0, 6), _drawable(title or "Subspace similarity per block"), fill=(235, 235, 235), font=font)
    if rows:
        draw.text((x0, 24), _drawable(summary_line(list(rows), threshold)), fill=(200, 200, 200), font=small)
    last_label_end = -1e9
    for blk in lay.blocks:
        for bar in blk.bars:
            if bar.copied_only:
                draw.rectangle([bar.x0, y0, bar.x1, y1], fill=bar.color)
            elif bar.phi_median is None:
                draw.rectangle([bar.x0, y1 - 2, bar.x1, y1], fill=bar.color)
            else:
                draw.rectangle([bar.x0, lay.y_of(bar.phi_median), bar.x1, y1], fill=bar.color)
                if bar.n > 1 and bar.phi_min is not None and bar.phi_min < bar.phi_median - 0.004:
                    draw.line([(bar.x0, lay.y_of(bar.phi_min)), (bar.x1, lay.y_of(bar.phi_min))], fill=MIN_LINE)
            if bar.phi_needed is not None:
                ty = lay.y_of(bar.phi_needed)
                draw.line([(bar.x0, ty), (bar.x1, ty)], fill=TICK)
            if bar.n_skipped:
                draw.rectangle([bar.x0, y1 + MARK_TOP, bar.x1, y1 + MARK_TOP + MARK_H - 1], fill=COLORS["low"])
        # block extent and label (skipped when it would overlap the previous one)
        draw.line([(blk.x0, y1 + 13), (blk.x1, y1 + 13)], fill=(150, 150, 150))
        label, count = blk.label, f"{blk.n_transferred}/{blk.n}"
        w = max(_text_width(small, label), _text_width(small, count))
        cx = (blk.x0 + blk.x1) / 2
        left = max(blk.x0, cx - w / 2)
        if left > last_label_end + 4:
            draw.text((left, y1 + 16), label, fill=(210, 210, 210), font=small)
            ok = blk.n_transferred == blk.n
            draw.text((left, y1 + 29), count, fill=COLORS["transferred"] if ok else COLORS["mixed"], font=small)
            last_label_end = left + w
    legend = ("bar: median phi of a layer family (dark line: lowest)   white tick: phi needed to pass   "
              "green: all pass   orange: some   red: none   red mark below: layers skipped   n/m: pass/layers")
    if any(bar.n_copied for bar in lay.bars):
        legend += "   teal full bar: copied as is (the layer barely moved: no SVD, no phi)"
    draw.text((x0, lay.height - 16), legend, fill=(190, 190, 190), font=small)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
