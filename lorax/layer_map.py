"""Which source layer feeds which target layer, when the two models' layers do not line up.

Distilled models (SSD-1B and Segmind Vega from SDXL, BK-SDM from SD1.5) keep some blocks of
their teacher and drop others, and ComfyUI renumbers what is left: the name
``…transformer_blocks.2…`` in SSD-1B may hold what was block 5 in SDXL. Names alone therefore
mislead. The map is built per *role* — same stage (input/middle/output, or a DiT's block kind),
same layer family (``attn1.to_q``, ``ff.2``…), same shape:

* where a role has as many layers in the target as in the source, layers pair by name order
  (no SVD needed);
* where the counts differ, every (target, source) candidate pair of the role is scored by the
  chance-normalised subspace similarity Φ̂ (the weaker of left and right) and the assignment
  that maximises the total score while keeping the layers' order is chosen (dynamic
  programming; each source layer used at most once — unless ``allow_reuse``, then each target
  layer takes its best source);
* a user-supplied map (JSON ``{"target key": "source key"}``) overrides both.

Layers of a role the source does not have, or whose best score is below ``min_score``, stay
unmatched and are reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

from .errors import LoraxError
from .report import family_of, short_key

MODES: tuple[str, ...] = ("name", "similarity")

#: (source key, target key) → Φ̂. A scorer may also have ``score_matrix(source_keys, target_keys)``
#: giving ``scores[target][source]`` for a whole role at once (see lorax.transfer.SimilarityScorer).
Scorer = Callable[[str, str], float]


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def role_of(key: str, shape) -> tuple:
    """(stage, family, shape): what a layer does, independent of its index."""
    stage = short_key(key).split(".")[0]
    return stage, family_of(key), tuple(shape)


@dataclass(frozen=True)
class LayerMatch:
    target: str
    source: str | None
    how: str              # "name", "order", "similarity", "user", "unmatched"
    score: float | None = None

    def row(self) -> dict:
        return {"target": self.target, "source": self.source, "how": self.how,
                "score": None if self.score is None else round(self.score, 6)}


@dataclass
class LayerMap:
    matches: dict[str, LayerMatch] = field(default_factory=dict)

    def source_of(self, target: str) -> str | None:
        m = self.matches.get(target)
        return None if m is None else m.source

    def pairs(self) -> list[tuple[str, str]]:
        """(source key, target key) for every matched target layer."""
        return [(m.source, m.target) for m in self.matches.values() if m.source is not None]

    @property
    def unmatched(self) -> list[str]:
        return [t for t, m in self.matches.items() if m.source is None]

    def summary(self) -> str:
        hows: dict[str, int] = {}
        for m in self.matches.values():
            hows[m.how] = hows.get(m.how, 0) + 1
        parts = [f"{n} by {how}" for how, n in sorted(hows.items()) if how != "unmatched"]
        return (f"layer map: {len(self.matches) - len(self.unmatched)} of {len(self.matches)} target layers matched"
                + (f" ({', '.join(parts)})" if parts else "") + f"; {len(self.unmatched)} unmatched")


def load_user_map(text: str, *, path: str | None = None) -> dict[str, str]:
    """Parse a user map: a JSON object ``{"target key": "source key"}``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoraxError(f"the layer map is not valid JSON: {e}", path=path) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise LoraxError('the layer map must be a JSON object {"target key": "source key", ...}', path=path)
    return data


def build_layer_map(source_shapes: Mapping[str, tuple], target_shapes: Mapping[str, tuple], *, mode: str = "similarity",
                    scorer: Scorer | None = None, user_map: Mapping[str, str] | None = None,
                    allow_reuse: bool = False, min_score: float = 0.0) -> LayerMap:
    """Map every target layer (matrix weights) to a source layer; see the module docstring."""
    if mode not in MODES:
        raise LoraxError(f"unknown layer-map mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "similarity" and scorer is None:
        raise ValueError("similarity mode needs a scorer")
    result = LayerMap()
    user_map = dict(user_map or {})
    for t, s in user_map.items():
        if t not in target_shapes:
            raise LoraxError(f"the layer map names a target layer the target model does not have", key=t)
        if s not in source_shapes:
            raise LoraxError(f"the layer map names a source layer the source model does not have", key=s)
        result.matches[t] = LayerMatch(t, s, "user")
    groups_s: dict[tuple, list[str]] = {}
    groups_t: dict[tuple, list[str]] = {}
    for k, shape in source_shapes.items():
        if len(shape) >= 2:
            groups_s.setdefault(role_of(k, shape), []).append(k)
    for k, shape in target_shapes.items():
        if len(shape) >= 2 and k not in result.matches:
            groups_t.setdefault(role_of(k, shape), []).append(k)
    for role, targets in groups_t.items():
        targets.sort(key=_natural)
        sources = sorted(groups_s.get(role, []), key=_natural)
        if mode == "name":
            for t in targets:
                ok = t in source_shapes and tuple(source_shapes[t]) == tuple(target_shapes[t])
                result.matches[t] = LayerMatch(t, t if ok else None, "name" if ok else "unmatched")
            continue
        if not sources:
            for t in targets:
                result.matches[t] = LayerMatch(t, None, "unmatched")
        elif len(sources) == len(targets):
            for t, s in zip(targets, sources):
                result.matches[t] = LayerMatch(t, s, "name" if s == t else "order")
        else:
            score_matrix = getattr(scorer, "score_matrix", None)
            scores = (score_matrix(sources, targets) if score_matrix is not None
                      else [[scorer(s, t) for s in sources] for t in targets])
            chosen = _best_assignment(scores, allow_reuse)
            for t, j, row in zip(targets, chosen, scores):
                if j is None or row[j] < min_score:
                    result.matches[t] = LayerMatch(t, None, "unmatched", None if j is None else row[j])
                else:
                    result.matches[t] = LayerMatch(t, sources[j], "similarity", row[j])
    return result


def _best_assignment(scores: list[list[float]], allow_reuse: bool) -> list[int | None]:
    """Per target row, the chosen source column: order-preserving and one-to-one (DP), or argmax."""
    n_t = len(scores)
    n_s = len(scores[0]) if scores else 0
    if allow_reuse:
        return [max(range(n_s), key=lambda j: row[j]) for row in scores]
    if n_t > n_s:  # more targets than sources: match the sources, leave the weakest targets out
        flipped = _best_assignment([[scores[i][j] for i in range(n_t)] for j in range(n_s)], False)
        out: list[int | None] = [None] * n_t
        for j, i in enumerate(flipped):
            out[i] = j
        return out
    neg = float("-inf")
    # best[i][j]: best total for the first i targets using sources < j, target i-1 at some source < j.
    best = [[neg] * (n_s + 1) for _ in range(n_t + 1)]
    take = [[False] * (n_s + 1) for _ in range(n_t + 1)]
    for j in range(n_s + 1):
        best[0][j] = 0.0
    for i in range(1, n_t + 1):
        for j in range(1, n_s + 1):
            skip = best[i][j - 1]
            use = best[i - 1][j - 1] + scores[i - 1][j - 1] if best[i - 1][j - 1] > neg else neg
            if use >= skip and use > neg:
                best[i][j], take[i][j] = use, True
            else:
                best[i][j] = skip
    out = [None] * n_t
    i, j = n_t, n_s
    while i > 0 and j > 0:
        if take[i][j]:
            out[i - 1] = j - 1
            i, j = i - 1, j - 1
        else:
            j -= 1
    return out
