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

Layers that match by name but differ in shape (Flux.1's 3072-wide layers in Flux.2's 6144-wide
model) are neither compared nor passed: Φ̂ compares subspaces of one space. When they are all the
adapter has, the verdict says so with the widths. Those the ``paired`` shape rule moves anyway
are counted apart — never as passing, so such an adapter at best *fits partly* — with their Φ̂ on
the side the two layers share where they share one, and the share of each delta's energy kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from .families import guess_architecture  # noqa: F401  (the verdict's "made for"; nodes import it from here)

#: Share of modules mapped and of mapped layers passing above which the adapter simply "fits".
FITS_SHARE = 0.9


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
    mismatched: int = 0         # mapped matrix layers left out because their shapes differ
    widths: tuple[int, int] | None = None   # (source, target) width of most layers whose shapes differ
    unscored: int = 0           # layers the paired shape rule moved without any Φ̂ (no side in common)
    paired_scored: int = 0      # layers it moved with a Φ̂ on the side they share
    paired_phi: tuple[float, float] | None = None    # lowest, highest of those Φ̂
    paired_kept: tuple[float, float] | None = None   # lowest, highest energy kept by the paired rule

    @property
    def level(self) -> str:
        moved_paired = self.unscored + self.paired_scored
        if self.mapped == 0 or (self.passed == 0 and moved_paired == 0 and (self.compared or self.mismatched)):
            return "does not fit"
        matrices = self.compared + self.mismatched + moved_paired
        if self.mapped >= FITS_SHARE * self.modules and self.passed >= FITS_SHARE * matrices:
            return "fits"
        return "fits partly"

    def _widths(self) -> str:
        if self.widths is None:
            return ""
        source, target = self.widths
        return f"the target's layers are {target} wide, the source's {source}"

    def _shapes(self) -> str:
        """The clauses on layers whose shapes differ (left out, or moved by the paired rule)."""
        out = ""
        if self.mismatched:
            widths = f" ({self._widths()})" if self.widths else ""
            out += f"; {_layers(self.mismatched)} differ in shape{widths} and were left out"
        if self.paired_scored:
            lo, hi = self.paired_phi
            phi = f"Φ̂ {lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"Φ̂ {lo:.2f}–{hi:.2f}"
            out += (f"; {_layers(self.paired_scored)} were moved across shapes by the paired rule, scored only on "
                    f"the side they share ({phi}; the threshold does not apply to the paired rule)")
        if self.unscored:
            widths = f"{self._widths()}: " if self.widths and not self.mismatched else ""
            out += (f"; {_layers(self.unscored)} were moved across shapes by the paired rule without a similarity "
                    f"score ({widths}Φ̂ compares subspaces of one space, and these layers share no side)")
        if self.paired_kept is not None:
            lo, hi = (f"{100 * x:.0f}" for x in self.paired_kept)
            out += (f"; the paired rule kept {lo} % of each delta's energy" if lo == hi else
                    f"; the paired rule kept {lo}–{hi} % of each delta's energy")
        return out

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
        moved_paired = self.unscored + self.paired_scored
        if self.compared == 0 and moved_paired == 0 and self.mismatched:
            every = "it differs" if self.mismatched == 1 else f"all {self.mismatched} of them differ"
            widths = f": {self._widths()}" if self.widths else ""
            return (f"Verdict: does not fit — {self._mapping()} by name, but {every} in shape{widths}: this "
                    f"adapter cannot move onto this model by name. Nothing was transferred.{te}")
        if self.compared == 0 and moved_paired == 0:
            return (f"Verdict: {self.level} — {self._mapping()}, but none of them is a matrix layer that can be "
                    f"compared (biases and norms only).{self._stock()}{te}")
        if self.passed == 0 and moved_paired == 0:
            return (f"Verdict: does not fit — {self._mapping()}, but none of the {self.compared} compared layers "
                    f"passes the similarity threshold{thr}: the target is no close relative of the source"
                    f"{self._shapes()}. Nothing was transferred.{self._stock()}{te}")
        scored = (f"; {self.passed} of {self.compared} mapped layers ({_pct(self.passed, self.compared)}) pass the "
                  f"similarity threshold{thr}" if self.compared else "")
        how = f" and are moved ({self.moved})" if self.moved and self.compared else ""
        kept = f"; {self.kept}" if self.kept else ""
        return f"Verdict: {self.level} — {self._mapping()}{scored}{how}{kept}{self._shapes()}.{self._stock()}{te}"

    def _stock(self) -> str:
        return f" {self.stock.sentence()}" if self.stock is not None else ""


def _layers(n: int) -> str:
    return "1 layer" if n == 1 else f"{n} layers"


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


def common_widths(shape_pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> tuple[int, int] | None:
    """``(source, target)`` width most of these layer pairs have: the smaller side of a layer is
    the model's hidden size for attention, MLP and modulation weights alike (3072 for every
    layer of Flux.1's blocks, 6144 for Flux.2's)."""
    counts = Counter((min(s), min(t)) for s, t in shape_pairs if len(s) >= 2 and len(t) >= 2)
    return counts.most_common(1)[0][0] if counts else None
