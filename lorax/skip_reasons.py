"""Why layers were left out of a transfer: one line per layer family instead of one per layer.

A transfer between models that do not line up (SD1.5 → SDXL, a LoRA for another model) leaves
hundreds of layers behind for a handful of reasons. Users need those reasons grouped the way
they think of a model — per layer family (``attn2.to_k``), with the shapes involved — and one
hint at what would change the outcome, not a thousand per-layer lines.
"""

from __future__ import annotations

import statistics
from typing import Iterable

from .report import family_of, family_sort_key
from .transfer import CROSS_ATTENTION_KV, Decision, LayerTransfer

PAIRED_HINT = ("Shape rule 'paired' would move the layers whose shapes differ by pairing their singular directions "
               "by index (the paper's rule; only meaningful for layers known to correspond).")


def _shape(shape) -> str:
    return "×".join(str(d) for d in shape)


def _mismatch(family: str, s_shape: tuple, t_shape: tuple) -> str:
    if family in CROSS_ATTENTION_KV and s_shape[0] == t_shape[0] and s_shape[1:] != t_shape[1:]:
        why = (f"the text-conditioning width differs, {_shape(s_shape[1:])} → {_shape(t_shape[1:])}: they read "
               "another text encoder's features")
    elif s_shape[0] != t_shape[0]:
        why = "the layer widths differ"
    else:
        why = "the input widths differ"
    return f"shapes {_shape(s_shape)} → {_shape(t_shape)} ({why})"


def _reason(layer: LayerTransfer, family: str) -> str:
    d = layer.decision
    if d is Decision.SHAPE_MISMATCH:
        return _mismatch(family, tuple(layer.shape_source), tuple(layer.shape_target))
    if d is Decision.LOW_SIMILARITY:
        return "below the similarity threshold"
    if d is Decision.MISSING_IN_TARGET:
        return "with no counterpart in the target"
    if d is Decision.CROSS_ATTENTION_OFF:
        return "cross-attention k/v transfer is turned off"
    return d.value


def why_left_out(layers: Iterable[LayerTransfer]) -> list[str]:
    """Per layer family (in model order), how many layers were left out and why, e.g.::

        attn2.to_k: 11 left out: 4 shapes 640×768 → 1280×2048 (the layer widths differ),
          2 shapes 640×768 → 640×2048 (the text-conditioning width differs, 768 → 2048: …),
          2 with no counterpart in the target

    plus a line per family moved across shapes by the paired rule, and the hint about the shape
    rule once when shapes kept layers out. Empty when every layer was transferred.
    """
    left: dict[str, dict[str, list[LayerTransfer]]] = {}
    paired: dict[str, int] = {}
    for layer in layers:
        family = family_of(layer.key)
        if layer.decision is Decision.TRANSFERRED:
            if layer.shape_source and layer.shape_target and tuple(layer.shape_source) != tuple(layer.shape_target):
                paired[family] = paired.get(family, 0) + 1
            continue
        left.setdefault(family, {}).setdefault(_reason(layer, family), []).append(layer)
    lines = []
    for family in sorted(set(left) | set(paired), key=family_sort_key):
        reasons = left.get(family, {})
        if reasons:
            parts = []
            for reason, members in sorted(reasons.items(), key=lambda r: (-len(r[1]), r[0])):
                scores = [m.similarity.phi_hat_min for m in members if m.similarity is not None]
                med = statistics.median(scores) if scores else 0.0
                median = f" (median Φ̂ {med if abs(med) >= 0.005 else 0.0:.2f})" if scores else ""
                parts.append(f"{len(members)} {reason}{median}")
            lines.append(f"{family}: {sum(len(m) for m in reasons.values())} left out: {', '.join(parts)}")
        if family in paired:
            lines.append(f"{family}: {paired[family]} transferred across shapes by the paired rule (singular "
                         "directions paired by index)")
    if any(l.decision is Decision.SHAPE_MISMATCH for fam in left.values() for ms in fam.values() for l in ms):
        lines.append(PAIRED_HINT)
    return lines
