"""The one-line answer to "does this adapter fit that model at all?", before the per-layer table.

Two shares decide it, in the order the work happens:

* how many of the adapter's modules name a layer of the target (known before any SVD: the host's
  key map either has the name or not); an adapter for another architecture maps nothing, and the
  user gets this sentence — with a guess at what the adapter *was* made for — instead of a
  warning per key;
* of the mapped matrix layers, how many have subspaces similar enough to be moved (Φ̂ above the
  threshold on both sides).

An adapter *fits* when at least :data:`FITS_SHARE` of both are met, *fits partly* when something
is transferred, and *does not fit* otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

#: Share of modules mapped and of mapped layers passing above which the adapter simply "fits".
FITS_SHARE = 0.9

#: Cross-attention context width (the input of attn2's key projection) of each UNet family.
_UNET_CONTEXT = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_SOME_UNET = "SD1.x, SD2.x or SDXL"
_UNET_NAMES = re.compile(r"(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)")
_FLUX_NAMES = re.compile(r"(double_blocks|single_blocks|single_transformer_blocks)")
_SD3_NAMES = re.compile(r"(joint_blocks|context_block|x_block)")
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", "_lora.down.weight", ".lora.down.weight")


def guess_architecture(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """What an adapter's module names (and, for UNets, the cross-attention width) say it was made
    for: ``"Flux"``, ``"SD3"``, ``"SD1.x"``, ``"SDXL"``…, or None when they say nothing clear."""
    names = list(tensors)
    if any(_FLUX_NAMES.search(n) for n in names):
        return "Flux"
    if any(_SD3_NAMES.search(n) for n in names):
        return "SD3"
    if any(_UNET_NAMES.search(n) for n in names):
        for name, t in tensors.items():
            if re.search(r"attn2[._]to_k", name) and name.endswith(_DOWN_SUFFIXES) and t.dim() >= 2:
                return _UNET_CONTEXT.get(int(t.shape[1]), _SOME_UNET)
        return _SOME_UNET
    return None


@dataclass(frozen=True)
class Verdict:
    """Counts behind the verdict line; ``line()`` is what the report, node and CLI print."""

    target: str                 # the target model's kind, e.g. "FluxSchnell"
    modules: int                # adapter modules considered (text-encoder ones without a CLIP are not)
    mapped: int                 # of those, how many name a layer of the target
    compared: int = 0           # mapped matrix layers that were scored
    passed: int = 0             # of those, how many cleared the threshold (were transferred)
    threshold: float | None = None
    unmapped_example: str | None = None
    architecture: str | None = None   # guess_architecture of the adapter, for the "does not fit" case
    text_encoder_skipped: int = 0
    stock: "StockLoaderView | None" = None  # what ComfyUI's own loader would do with the same adapter
    moved: str = ""                   # how the passing layers were moved, e.g. "70 copied, 2 transported"
    kept: str = ""                    # how much of the adapter's change they keep (lorax.report.kept_phrase)

    @property
    def level(self) -> str:
        if self.mapped == 0 or (self.compared and self.passed == 0):
            return "does not fit"
        if self.mapped >= FITS_SHARE * self.modules and self.passed >= FITS_SHARE * self.compared:
            return "fits"
        return "fits partly"

    def _mapping(self) -> str:
        where = f"layers of this {self.target} model"
        if self.mapped == self.modules:
            return f"all {self.modules} adapter modules map onto {where}"
        missed = self.modules - self.mapped
        example = f", e.g. {self.unmapped_example}" if self.unmapped_example else ""
        return (f"{self.mapped} of {self.modules} adapter modules ({_pct(self.mapped, self.modules)}) map onto "
                f"{where} ({missed} match none{example})")

    def names_line(self) -> str:
        """The verdict from the key map alone (no source model, so no similarity): what a library
        scan without a source says. An adapter that maps nothing gets :meth:`line`'s sentence."""
        if self.mapped == 0:
            return self.line()
        return (f"Verdict: {self.level} — {self._mapping()}; similarity not scored (no source model given)."
                + (f" {self.text_encoder_skipped} text-encoder modules were not counted."
                   if self.text_encoder_skipped else ""))

    def line(self) -> str:
        thr = "" if self.threshold is None else f" (Φ̂ ≥ {self.threshold:g})"
        te = (f" {self.text_encoder_skipped} text-encoder modules were not counted: connect a CLIP to move them."
              if self.text_encoder_skipped else "")
        if self.mapped == 0:
            made_for = f" (its module names say {self.architecture})" if self.architecture else ""
            none = ("the adapter's only module matches no layer" if self.modules == 1 else
                    f"none of the adapter's {self.modules} modules matches a layer")
            return (f"Verdict: does not fit — {none} of this {self.target} model: it was made for another "
                    f"architecture{made_for}. Nothing was transferred; connect a source model of the adapter's "
                    f"own architecture.{te}")
        if self.compared == 0:
            return (f"Verdict: {self.level} — {self._mapping()}, but none of them is a matrix layer that can be "
                    f"compared (biases and norms only).{self._stock()}{te}")
        if self.passed == 0:
            return (f"Verdict: does not fit — {self._mapping()}, but none of the {self.compared} compared layers "
                    f"passes the similarity threshold{thr}: the target is no close relative of the source. "
                    f"Nothing was transferred.{self._stock()}{te}")
        how = f" and are moved ({self.moved})" if self.moved else ""
        kept = f"; {self.kept}" if self.kept else ""
        return (f"Verdict: {self.level} — {self._mapping()}; {self.passed} of {self.compared} mapped layers "
                f"({_pct(self.passed, self.compared)}) pass the similarity threshold{thr}{how}{kept}.{self._stock()}{te}")

    def _stock(self) -> str:
        return f" {self.stock.sentence()}" if self.stock is not None else ""


@dataclass(frozen=True)
class StockLoaderView:
    """What ComfyUI's stock LoRA loader would do with the adapter on the target: it applies a module by
    name where the target has that layer with the delta's shape, and drops it otherwise (no layer,
    or a layer of another shape). Read from names and shapes only."""

    applies: int
    missing: int
    other_shape: int

    @classmethod
    def of(cls, shapes: Mapping[str, tuple[int, ...]], target_shape) -> "StockLoaderView":
        """``shapes``: the adapter's deltas (by model key) and their shapes; ``target_shape(key)`` the
        target's shape of that key or None."""
        applies = missing = other = 0
        for key, shape in shapes.items():
            t = target_shape(key)
            if t is None:
                missing += 1
            elif tuple(t) != tuple(shape):
                other += 1
            else:
                applies += 1
        return cls(applies, missing, other)

    def sentence(self) -> str:
        n = self.applies + self.missing + self.other_shape
        if n == 0:
            return ""
        lost = [f"{c} {what}" for c, what in ((self.missing, "for want of a layer of that name"),
                                              (self.other_shape, "for a layer of another shape")) if c]
        if not lost:
            return f"The stock LoRA loader would apply all {n} of these layers as they are."
        return (f"The stock LoRA loader would apply {self.applies} of these {n} layers as they are and miss "
                f"{' and '.join(lost)}.")


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.0f} %" if b else "–"
