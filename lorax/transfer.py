"""Moving a set of deltas from a source model onto a target model, layer by layer.

For each layer the adapter touches: look the layer up in the target; decompose source and
target weights (through the :class:`~lorax.engine.SVDEngine`, cached and batched); score the
pair with Φ and its chance-normalised Φ̂ (:mod:`lorax.similarity`); project the delta
(:mod:`lorax.projection`) when Φ̂ clears the threshold on both sides; report the decision.

Defaults, and why:

* **rank k** — for ordinary LoRAs ``min(rank, rank(W)/2)`` with ``rank = 320`` by default: the
  seed paper uses the 320 largest singular values for Stable Diffusion, and the cap at half the
  layer's rank keeps the projection from being the identity (at k = rank(W) it is a plain copy
  and Φ̂ carries no information), so one setting serves layers of every width. The report shows
  the k used per layer. A rank larger than every layer the adapter touches is an error. For
  LoRA-X adapters k is the adapter's own r, the subspace it was trained in.
* **threshold** on Φ̂ (not raw Φ, whose chance level depends on width); see
  :data:`DEFAULT_THRESHOLD`.
* **mode** ``auto``: per layer, the adapter's own delta where the target weight lies within
  :data:`DEFAULT_COPY_BELOW` (50 %) of the source weight's norm — measured without any SVD, so such a
  layer is never decomposed — and :func:`~lorax.projection.project_transport` (the delta rotated by
  the direct rotations of the source's top-k subspaces onto the target's) where it moved more. The
  trained-model benchmark (``bench/trained_fidelity.py``, docs/fidelity.md, 3 seeds) measured copying
  keeping more of an ordinary LoRA's effect than every projection and rotation on every target
  (fine-tune / far fine-tune / distilled student: 0.86 / 0.25 / 0.11 of the trained-on-target style
  gain, against 0.22 / 0.02 / 0.03 for ``prolora``, the default up to 0.2.0), and the same for LoRA-X
  adapters; a larger bound was better or equal on every target up to 0.5, which copied every layer
  of all three (the most any moved was 34 %). Beyond it no trained pair was measured: those layers
  are transported, and the Φ̂ threshold leaves out the layers of an unrelated model. ``copy``,
  ``transport``, ``prolora_cross``, ``prolora`` and ``lorax`` stay selectable. A LoRA-X adapter that
  is not copied moves at its own rank r (``prolora`` is ``lorax`` for it: its delta lies in the
  source's subspace).
* **shapes that differ** are skipped unless ``shape_rule="paired"`` selects the seed's
  dimension-mismatch rule: pairing singular directions by index is only meaningful between
  layers known to correspond, which a name match does not prove.
* **cross-attention k/v** (``attn2.to_k`` / ``attn2.to_v``) read the text encoder's features.
  Between models with the same text encoder they move like any layer; where the
  text-conditioning width differs (SD1.5's 768 → SDXL's 2048) their shapes differ, so the shape
  rule above decides, and ``cross_attention_kv=False`` leaves them out in every case (a LoRA
  whose style lives in the prompt's reading then moves only its image-side part).

Layers are processed in groups of equal shape (``engine.pairs_per_call`` at a time), weights
are fetched from the source and target lazily through :class:`WeightSource`, and each group's
tensors are dropped before the next is read, so memory in flight stays at a few layers.

A key may name a slice of a fused weight (:mod:`lorax.fused`, e.g. the q rows of Flux's
``img_attn.qkv``): the slice is then the layer — decomposed, scored and projected on its own —
and a layer map pairs it through its fused weight.

One module although over 600 lines: :func:`transfer_deltas` and the per-layer helpers below it
are one algorithm (group, decompose, score, decide, project) sharing its private types; split,
a layer's decision would be read across files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import torch

from .delta import Delta
from .engine import SVDEngine
from .errors import LoraxError
from .fused import parse_slice_key, with_slices
from .layer_map import LayerMap
from .projection import (project_lorax, project_paired, project_prolora, project_prolora_cross,
                         project_transport)
from .report import family_of
from .similarity import LayerSimilarity, layer_similarity, shared_sides
from .svd import SVDFactors, max_rank
from .weight_formats import dense_weight, logical_shape

#: Default rank for ordinary LoRAs (the seed's "320 largest singular values" for SD). The fidelity
#: benchmark (bench/fidelity.py, docs/fidelity.md) found larger k and LoRA-X r better up to 320.
DEFAULT_RANK = 320
#: Default threshold on Φ̂ (chance-normalised). The paper gives no value; 0.3 rejects layers that
#: are barely above chance while keeping fine-tunes. The fidelity benchmark measured no difference
#: between 0 and 0.95 on fine-tunes (their layers' Φ̂ ≥ 0.977) and no threshold that rescues a far target.
DEFAULT_THRESHOLD = 0.3
SHAPE_RULES: tuple[str, ...] = ("skip", "paired")
#: How a layer pair of equal shape is moved (see the module docstring and :mod:`lorax.projection`);
#: ``auto`` decides per layer between ``copy`` and ``transport``.
MODES: tuple[str, ...] = ("auto", "copy", "transport", "prolora", "prolora_cross", "lorax")
#: Default mode (see the module docstring).
DEFAULT_MODE = "auto"
#: ``auto`` copies a layer whose target weight lies within this share of the source weight's norm
#: (``‖W_t − W_s‖ / ‖W_s‖``), without decomposing either; farther layers are transported.
DEFAULT_COPY_BELOW = 0.5
#: Layer families that read the text encoder's features in a UNet (see the module docstring).
CROSS_ATTENTION_KV: frozenset[str] = frozenset({"attn2.to_k", "attn2.to_v"})


class Decision(str, Enum):
    TRANSFERRED = "transferred"
    LOW_SIMILARITY = "skipped: similarity below threshold"
    SHAPE_MISMATCH = "skipped: shape mismatch"
    MISSING_IN_TARGET = "missing in target"
    NOT_A_MATRIX = "skipped: not a matrix weight"
    CROSS_ATTENTION_OFF = "skipped: cross-attention k/v turned off"


class WeightSource(Protocol):
    """Read access to a model's weights by key, loading each only when asked."""

    def shape(self, key: str) -> tuple[int, ...] | None: ...

    def weight(self, key: str) -> torch.Tensor: ...


class DictWeights:
    """A :class:`WeightSource` over an in-memory mapping (a state dict)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, key: str):
        t = self.tensors.get(key)
        return None if t is None else logical_shape(t)

    def weight(self, key: str) -> torch.Tensor:
        return dense_weight(self.tensors[key], key=key)


@dataclass(frozen=True)
class TransferSettings:
    """How to transfer; validated on construction so a bad setting fails before any work."""

    rank: int = DEFAULT_RANK
    threshold: float = DEFAULT_THRESHOLD
    mode: str = DEFAULT_MODE
    shape_rule: str = "skip"
    cross_attention_kv: bool = True
    copy_below: float = DEFAULT_COPY_BELOW

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraxError(f"rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= float(self.threshold) <= 1.0):
            raise LoraxError(f"threshold must lie in [0, 1] (it applies to the chance-normalised "
                             f"similarity Φ̂), got {self.threshold!r}")
        if self.mode not in MODES:
            raise LoraxError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if not (isinstance(self.copy_below, (int, float)) and not isinstance(self.copy_below, bool)
                and 0.0 <= float(self.copy_below) < float("inf")):
            raise LoraxError(f"copy_below must be a share of the weight's norm of 0 or more (0.25: layers that "
                             f"moved by at most 25 % are copied), got {self.copy_below!r}")
        if self.shape_rule not in SHAPE_RULES:
            raise LoraxError(f"unknown shape rule {self.shape_rule!r}; expected one of {', '.join(SHAPE_RULES)}")

    def rank_for(self, shape, adapter_rank: int | None = None) -> int:
        full = max_rank(shape)
        if adapter_rank is not None:
            return min(adapter_rank, full)
        return max(1, min(self.rank, full // 2))


@dataclass
class LayerTransfer:
    """The outcome for one layer: decision, scores, and the transferred delta if any.

    ``key`` is the source layer; ``target_key`` the target layer it went to when a layer map
    paired differently named layers (None: the same key).
    """

    key: str
    decision: Decision
    shape_source: tuple[int, ...] | None
    shape_target: tuple[int, ...] | None
    rank: int | None = None
    similarity: LayerSimilarity | None = None
    energy_kept: float | None = None
    note: str = ""
    delta: Delta | None = field(default=None, repr=False)
    target_key: str | None = None
    how: str | None = None                 # for a moved layer: "copied", "transported", "projected (…)", "paired"
    weight_change: float | None = None     # ‖W_t − W_s‖ / ‖W_s‖ where it was measured
    cosine: float | None = None            # cosine of the written delta against the adapter's own
    #: Φ̂ (left, right) of a pair the paired shape rule scored on the sides it shares (None: not shared).
    paired_phi_hat: tuple[float | None, float | None] | None = None

    @property
    def unscored(self) -> bool:
        """Moved across shapes with no Φ̂ on either side (the paired rule on layers sharing no side)."""
        return self.paired_phi_hat is not None and self.paired_phi_hat == (None, None)

    @property
    def target(self) -> str:
        return self.target_key or self.key

    def row(self) -> dict:
        """A JSON-ready row for reports (no tensors). Slices of fused weights also carry
        ``"fused"`` (the whole weight's key) and ``"slice"`` (which part of it)."""
        s = self.similarity
        out = {
            "key": self.target,
            "source_key": self.key,
            "decision": self.decision.value,
            "phi": None if s is None else round(s.phi, 6),
            "phi_right": None if s is None else round(s.phi_right, 6),
            "chance": None if s is None else round(s.chance, 6),
            "chance_right": None if s is None else round(s.chance_right, 6),
            "phi_hat": _rounded(s.phi_hat if s is not None else (self.paired_phi_hat or (None, None))[0]),
            "phi_hat_right": _rounded(s.phi_hat_right if s is not None else (self.paired_phi_hat or (None, None))[1]),
            "rank": self.rank,
            "energy_kept": None if self.energy_kept is None else round(self.energy_kept, 6),
            "cos_kept": None if self.cosine is None else round(self.cosine, 6),
            "how": self.how,
            "weight_change": None if self.weight_change is None else round(self.weight_change, 6),
            "shape_source": list(self.shape_source) if self.shape_source else None,
            "shape_target": list(self.shape_target) if self.shape_target else None,
            "note": self.note,
        }
        part = parse_slice_key(self.target)
        if part is not None:
            out["fused"] = part.key
            out["slice"] = part.describe()
        return out


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


@dataclass
class TransferResult:
    layers: list[LayerTransfer]
    settings: TransferSettings
    seconds: float = 0.0

    @property
    def deltas(self) -> dict[str, Delta]:
        """Transferred deltas by *target* key."""
        return {l.target: l.delta for l in self.layers if l.delta is not None}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for l in self.layers:
            out[l.decision.value] = out.get(l.decision.value, 0) + 1
        return out

    def summary(self) -> str:
        n = len(self.layers)
        done = sum(1 for l in self.layers if l.decision is Decision.TRANSFERRED)
        parts = [f"{done} of {n} layers transferred"]
        hows: dict[str, int] = {}
        for l in self.layers:
            if l.how:
                hows[l.how] = hows.get(l.how, 0) + 1
        if hows:
            parts[0] += " (" + ", ".join(f"{c} {h}" for h, c in sorted(hows.items(), key=lambda x: -x[1])) + ")"
        for name, c in sorted(self.counts().items()):
            if name != Decision.TRANSFERRED.value:
                parts.append(f"{c} {name}")
        mode = self.settings.mode
        if mode == "auto":
            mode += f" (copy where the weight moved ≤ {self.settings.copy_below:.0%}, else transport)"
        parts.append(f"mode {mode}, threshold Φ̂ ≥ {self.settings.threshold:g} on both sides")
        parts.append(f"{self.seconds:.1f} s")
        return "; ".join(parts)


Progress = Callable[[int, int], None]


@torch.no_grad()
def transfer_deltas(deltas: Mapping[str, Delta], source: WeightSource, target: WeightSource,
                    settings: TransferSettings, engine: SVDEngine, *,
                    adapter_ranks: Mapping[str, int] | None = None, layer_map: LayerMap | None = None,
                    progress: Progress | None = None) -> TransferResult:
    """Transfer every delta onto the target (see the module docstring).

    ``deltas`` are keyed by source weight key (e.g.
    ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``); without a
    ``layer_map`` each goes to the target weight of the same key, with one (see
    :mod:`lorax.layer_map`) to the target layers mapped from it. ``adapter_ranks`` gives the k
    to use per source key for LoRA-X adapters. Keys may be slice keys (:mod:`lorax.fused`).
    """
    t0 = time.perf_counter()
    source, target = with_slices(source), with_slices(target)
    adapter_ranks = adapter_ranks or {}
    _check_explicit_rank({k: d for k, d in deltas.items() if k not in adapter_ranks}, source, settings)
    targets_of: dict[str, list[str]] = {}
    if layer_map is not None:
        for s_key, t_key in layer_map.pairs():
            targets_of.setdefault(s_key, []).append(t_key)
    mapped_targets = {t for ts in targets_of.values() for t in ts}
    results: dict[tuple[str, str | None], LayerTransfer] = {}
    order: list[tuple[str, str | None]] = []
    groups: dict[tuple, list[tuple[str, str]]] = {}
    moving: dict[tuple[str, str], float] = {}  # pairs auto transports, with their measured weight change
    for key, delta in deltas.items():
        s_shape = source.shape(key) or tuple(delta.shape)
        t_keys = _target_keys(key, targets_of) if layer_map is not None else [key]
        if not t_keys and key not in mapped_targets and target.shape(key) not in (None, tuple(s_shape)):
            # A map pairs layers of equal shape only; the same-named target layer of another shape
            # (SD1.5's 768-wide cross-attention k/v in SDXL, say) is left to the shape rule.
            t_keys = [key]
        if not t_keys or target.shape(t_keys[0]) is None:
            note = ("no target layer is mapped from this layer" if layer_map is not None
                    else "the target model has no weight with this key")
            order.append((key, None))
            results[(key, None)] = LayerTransfer(key, Decision.MISSING_IN_TARGET, s_shape, None, note=note)
            continue
        for t_key in t_keys:
            t_shape = target.shape(t_key)
            order.append((key, t_key))
            moved_to = None if t_key == key else t_key
            if len(t_shape) < 2:
                results[(key, t_key)] = LayerTransfer(key, Decision.NOT_A_MATRIX, s_shape, t_shape, target_key=moved_to,
                                                      note="biases and norms have no singular subspace")
            elif not settings.cross_attention_kv and is_cross_attention_kv(t_key):
                results[(key, t_key)] = LayerTransfer(key, Decision.CROSS_ATTENTION_OFF, s_shape, t_shape,
                                                      target_key=moved_to, note="cross_attention_kv is off")
            elif tuple(s_shape) != tuple(t_shape) and settings.shape_rule == "skip":
                results[(key, t_key)] = LayerTransfer(
                    key, Decision.SHAPE_MISMATCH, s_shape, t_shape, target_key=moved_to,
                    note="shapes differ; the 'paired' shape rule would pair singular directions by index")
            elif tuple(s_shape) == tuple(t_shape) and settings.mode in ("copy", "auto"):
                change = engine.weight_change(_loader(source, key), _loader(target, t_key),
                                              (_identity(source, key), _identity(target, t_key)))
                if settings.mode == "copy" or change <= settings.copy_below:
                    results[(key, t_key)] = _copied(key, delta, s_shape, change, moved_to)
                else:
                    moving[(key, t_key)] = change
                    groups.setdefault((tuple(s_shape), tuple(t_shape)), []).append((key, t_key))
            else:
                groups.setdefault((tuple(s_shape), tuple(t_shape)), []).append((key, t_key))
    total = len(order)
    done = len(results)
    if progress:
        progress(done, total)
    for (s_shape, t_shape), pairs in groups.items():
        for start in range(0, len(pairs), engine.pairs_per_call):
            chunk = pairs[start:start + engine.pairs_per_call]
            ks = [_rank_for_pair(settings, s_shape, t_shape, adapter_ranks.get(s_key)) for s_key, _ in chunk]
            needs_source = [_pair_rule(settings.mode, s_key in adapter_ranks) != "lorax" for s_key, _ in chunk]
            inputs = _inputs_of_pairs(engine, source, target, chunk, ks, scored=s_shape == t_shape,
                                      threshold=settings.threshold, needs_source=needs_source)
            for (s_key, t_key), k, pair in zip(chunk, ks, inputs):
                layer = _transfer_one(s_key, deltas[s_key], pair, s_shape, t_shape, k, settings, engine,
                                      lorax_adapter=s_key in adapter_ranks)
                layer.target_key = None if t_key == s_key else t_key
                layer.weight_change = moving.get((s_key, t_key))
                results[(s_key, t_key)] = layer
            done += len(chunk)
            if progress:
                progress(done, total)
    return TransferResult([results[p] for p in order], settings, time.perf_counter() - t0)


def _target_keys(key: str, targets_of: Mapping[str, list[str]]) -> list[str]:
    """The target layers a layer map sends ``key`` to; a slice goes to the same rows of the
    target layers its fused weight is mapped to."""
    part = parse_slice_key(key)
    if part is None:
        return targets_of.get(key, [])
    return [part.on(t).name for t in targets_of.get(part.key, [])]


class SimilarityScorer:
    """Φ̂ (the weaker side) of a source and a target layer of equal shape, for layer maps.

    A map scores every candidate pair of a role — 8 × 20 pairs for SSD-1B's 1280-wide input
    blocks — so each layer should be read and decomposed once, without holding all of them:
    :meth:`score_matrix` keeps the role's target factors and decomposes the source layers a
    few at a time (side by side on the CPU, found by file identity when cached), scoring each
    against every target before the next few. Memory is the targets plus ``pairs_per_call``
    source layers, and no layer is decomposed twice even without a cache. Scores of layers whose
    content digest is known from a file identity (:class:`~lorax.safetensors_weights.SafetensorsWeights`:
    the command line, the benchmarks) are remembered by the engine and its store, so building
    the same map again reads no factors at all.
    """

    def __init__(self, source: WeightSource, target: WeightSource, engine: SVDEngine, rank: int = DEFAULT_RANK):
        self.source, self.target, self.engine = with_slices(source), with_slices(target), engine
        self.settings = TransferSettings(rank=rank)

    def _fetch(self, side: str, keys: Sequence[str]) -> list:
        weights = self.source if side == "s" else self.target
        return self.engine.factors_many(
            [(_loader(weights, key), self.settings.rank_for(weights.shape(key))) for key in keys],
            identities=[_identity(weights, key) for key in keys], origins=[_origin(weights)] * len(keys))

    def _k(self, source_key: str) -> int:
        return self.settings.rank_for(self.source.shape(source_key))

    def _score(self, source_key: str, target_key: str, fs, ft) -> float:
        sim = layer_similarity(fs, ft, self._k(source_key))
        digests = self._digests(source_key, target_key)  # known now, for weights with an identity
        if digests is not None:
            self.engine.remember_similarity(digests, sim)
        return sim.phi_hat_min

    @torch.no_grad()
    def score_matrix(self, source_keys: Sequence[str], target_keys: Sequence[str]) -> list[list[float]]:
        """``scores[i][j]``: Φ̂ of target ``i`` and source ``j`` (see the class docstring)."""
        scores: list[list[float | None]] = [[self._remembered(s, t) for s in source_keys] for t in target_keys]
        rows = [i for i, row in enumerate(scores) if None in row]
        cols = [j for j in range(len(source_keys)) if any(scores[i][j] is None for i in rows)]
        targets = dict(zip(rows, self._fetch("t", [target_keys[i] for i in rows])))
        step = max(1, self.engine.pairs_per_call)
        for start in range(0, len(cols), step):
            chunk = cols[start:start + step]
            for j, fs in zip(chunk, self._fetch("s", [source_keys[j] for j in chunk])):
                for i, ft in targets.items():
                    if scores[i][j] is None:
                        scores[i][j] = self._score(source_keys[j], target_keys[i], fs, ft)
        return scores  # type: ignore[return-value]

    def _digests(self, source_key: str, target_key: str) -> tuple[str, str] | None:
        ds = self.engine.known_digest(_identity(self.source, source_key))
        dt = self.engine.known_digest(_identity(self.target, target_key))
        return (ds, dt) if ds is not None and dt is not None else None

    def _remembered(self, source_key: str, target_key: str) -> float | None:
        digests = self._digests(source_key, target_key)
        sim = None if digests is None else self.engine.similarity_of(digests, self._k(source_key))
        return None if sim is None else sim.phi_hat_min

    @torch.no_grad()
    def __call__(self, source_key: str, target_key: str) -> float:
        (fs,), (ft,) = self._fetch("s", [source_key]), self._fetch("t", [target_key])
        return self._score(source_key, target_key, fs, ft)


def similarity_scorer(source: WeightSource, target: WeightSource, engine: SVDEngine,
                      rank: int = DEFAULT_RANK) -> SimilarityScorer:
    """The scorer layer maps use (see :class:`SimilarityScorer`)."""
    return SimilarityScorer(source, target, engine, rank)


@dataclass
class _PairInputs:
    """What one layer pair needs: factors on the engine's device (None where not needed, see
    :func:`_inputs_of_pairs`) and, for layers of one shape, their similarity."""

    source: SVDFactors | None
    target: SVDFactors | None
    similarity: LayerSimilarity | None = None


def _inputs_of_pairs(engine: SVDEngine, source: WeightSource, target: WeightSource, pairs: list[tuple[str, str]],
                     ks: list[int], *, scored: bool = True, threshold: float | None = None,
                     needs_source: Sequence[bool] | None = None) -> list[_PairInputs]:
    """Factors and similarity of ``(source key, target key)`` pairs, the factors asked for in one
    call so the engine can run all of them side by side.

    For layers of one shape (``scored``) the similarity is computed from the factors and
    remembered by the two weights' content digests (:meth:`SVDEngine.similarity_of`); a similarity
    remembered by an earlier run is not computed again, and then only the factors the caller still
    needs are read: none for a pair below ``threshold`` (or for every pair when there is no
    threshold: a table of scores), the target's alone where ``needs_source`` is false. For a warm
    SDXL transfer with the ``lorax`` projection that halves the factors read and drops the Φ
    products, which took more than a third of the run (docs/performance.md).
    """
    needs_source = needs_source if needs_source is not None else [True] * len(pairs)
    slots: list[tuple[int, str]] = []  # (pair index, "s" or "t") of each request
    requests, digests, origins = [], [], []
    found: list[tuple[str, str, LayerSimilarity | None]] = []
    for i, ((s_key, t_key), k) in enumerate(zip(pairs, ks)):
        ds, ws = engine.digest_of(_loader(source, s_key), _identity(source, s_key))
        dt, wt = engine.digest_of(_loader(target, t_key), _identity(target, t_key))
        sim = engine.similarity_of((ds, dt), k) if scored else None
        found.append((ds, dt, sim))
        if sim is None:
            wanted = ("s", "t")
        elif threshold is None or sim.phi_hat_min < threshold:
            wanted = ()
        else:
            wanted = ("s", "t") if needs_source[i] else ("t",)
        for side in wanted:
            slots.append((i, side))
            requests.append((ws if side == "s" else wt, k))
            digests.append(ds if side == "s" else dt)
            origins.append(_origin(source if side == "s" else target))
        del ws, wt  # a weight read to hash it is kept only by a request that needs its factors
    factors = engine.factors_many(requests, digests=digests, origins=origins)
    out = [_PairInputs(None, None, sim) for _, _, sim in found]
    for (i, side), f in zip(slots, factors):
        f = f.to(device=engine.device)
        if side == "s":
            out[i].source = f
        else:
            out[i].target = f
    for (ds, dt, known), pair, k in zip(found, out, ks):
        if scored and known is None:
            pair.similarity = layer_similarity(pair.source, pair.target, k)
            engine.remember_similarity((ds, dt), pair.similarity)
    return out


def is_cross_attention_kv(key: str) -> bool:
    """A UNet cross-attention key or value projection (reads the text encoder's features)."""
    return family_of(key) in CROSS_ATTENTION_KV


def _loader(source: WeightSource, key: str):
    return lambda: source.weight(key)


def _identity(source: WeightSource, key: str) -> str | None:
    """The source's cheap identity for a weight, when it has one (see SVDEngine.factors_many)."""
    identity = getattr(source, "identity", None)
    return identity(key) if identity is not None else None


def _origin(source: WeightSource) -> str | None:
    """The model a source's weights come from (a file path or a label), when it says: what the SVD
    cache lists its entries under."""
    origin = getattr(source, "origin", None)
    return origin() if callable(origin) else origin


def _rank_for_pair(settings: TransferSettings, s_shape, t_shape, adapter_rank) -> int:
    return min(settings.rank_for(s_shape, adapter_rank), settings.rank_for(t_shape, adapter_rank))


def _check_explicit_rank(deltas: Mapping[str, Delta], source: WeightSource, settings: TransferSettings) -> None:
    if not deltas:
        return
    shapes = [source.shape(k) or d.shape for k, d in deltas.items()]
    largest = max((max_rank(s) for s in shapes if len(s) >= 2), default=0)
    if largest and settings.rank > largest:
        raise LoraxError(f"rank {settings.rank} is larger than every layer the adapter touches "
                         f"(the largest has rank {largest}); choose a rank of at most {largest}")


def _transfer_one(key, delta, pair: _PairInputs, s_shape, t_shape, k, settings, engine, *,
                  lorax_adapter: bool) -> LayerTransfer:
    dev = engine.device
    fs, ft, sim = pair.source, pair.target, pair.similarity
    if tuple(s_shape) != tuple(t_shape):
        # Scored where the pair shares a side, for the report and the verdict; the rule is the
        # user's explicit choice for layers known to correspond, so the threshold does not gate it.
        scores = shared_sides(fs, ft, min(fs.k, ft.k))
        moved = project_paired(delta, fs, ft, t_shape)
        result = LayerTransfer(key, Decision.TRANSFERRED, s_shape, t_shape, rank=min(fs.k, ft.k), how="paired",
                               paired_phi_hat=scores, note=_paired_note(s_shape, t_shape, scores))
    else:
        if sim.phi_hat_min < settings.threshold:
            return LayerTransfer(key, Decision.LOW_SIMILARITY, s_shape, t_shape, rank=k, similarity=sim,
                                 note=f"Φ̂ {sim.phi_hat:.3f} / {sim.phi_hat_right:.3f} (left/right) "
                                      f"< {settings.threshold:g}")
        rule = _pair_rule(settings.mode, lorax_adapter)
        moved = _PAIR_RULES[rule](delta, fs, ft)
        result = LayerTransfer(key, Decision.TRANSFERRED, s_shape, t_shape, rank=k, similarity=sim,
                               how="transported" if rule == "transport" else f"projected ({rule})")
    given = delta.to(device=dev, dtype=ft.U.dtype)
    before = given.norm()
    result.energy_kept = moved.norm() / before if before > 0 else 0.0
    if tuple(s_shape) == tuple(t_shape):
        result.cosine = moved.cosine(given)
    result.delta = moved.to(device="cpu", dtype=torch.float32)
    return result


def _pair_rule(mode: str, lorax_adapter: bool) -> str:
    """The rule one layer pair of equal shape is moved with, once ``auto``'s copies are decided.

    ``auto`` transports what it does not copy. A LoRA-X delta lies in the source's top-k subspaces,
    so prolora's null-space part is zero: for it ``prolora`` is ``lorax`` without doubling the rank.
    """
    if mode in ("auto", "copy"):
        return "transport"
    if lorax_adapter and mode == "prolora":
        return "lorax"
    return mode


_PAIR_RULES: dict[str, Callable[[Delta, SVDFactors, SVDFactors], Delta]] = {
    "lorax": lambda d, fs, ft: project_lorax(d, ft),
    "prolora": project_prolora,
    "prolora_cross": project_prolora_cross,
    "transport": project_transport,
}


def _copied(key: str, delta: Delta, shape, change: float, moved_to: str | None) -> LayerTransfer:
    """A layer moved as it is: no decomposition, the whole delta kept."""
    return LayerTransfer(key, Decision.TRANSFERRED, shape, shape, energy_kept=1.0, cosine=1.0, how="copied",
                         weight_change=change, target_key=moved_to,
                         delta=delta.to(device="cpu", dtype=torch.float32),
                         note=f"target weight within {change:.1%} of the source's: copied as is")


def _paired_note(s_shape, t_shape, scores: tuple[float | None, float | None]) -> str:
    """What the paired rule did with a pair of different shapes and what could be scored."""
    shapes = f"{'×'.join(map(str, s_shape))} → {'×'.join(map(str, t_shape))}"
    left, right = scores
    if left is None and right is None:
        score = "unscored: the layers share no side, so Φ̂ (which compares subspaces of one space) is undefined"
    elif right is None:
        score = f"Φ̂ {left:.3f} on the output side they share ({s_shape[0]}); the input sides differ"
    elif left is None:
        score = f"Φ̂ {right:.3f} on the input side they share ({s_shape[1]}); the output sides differ"
    else:  # equal shapes never come here
        score = f"Φ̂ {left:.3f} / {right:.3f}"
    return f"shapes differ ({shapes}): singular directions paired by index (seed's rule); {score}"


@torch.no_grad()
def similarity_table(source: WeightSource, target: WeightSource, keys: Iterable[str | tuple[str, str]],
                     engine: SVDEngine, rank: int = DEFAULT_RANK, progress: Progress | None = None) -> list[dict]:
    """Per-layer Φ rows for two models over ``keys``: a key present in both models, or a
    ``(source key, target key)`` pair from a layer map. Pairs that are not matrix weights of
    equal shape are left out.

    Rows: ``{"key" (the target's), "source_key", "phi", "phi_right", "chance", "chance_right",
    "phi_hat", "phi_hat_right", "k", "shape_source", "shape_target"}``, sorted by Φ ascending
    (least similar first).
    """
    settings = TransferSettings(rank=rank)
    source, target = with_slices(source), with_slices(target)
    by_shape: dict[tuple, list[tuple[str, str]]] = {}
    for item in keys:
        s_key, t_key = (item, item) if isinstance(item, str) else item
        s, t = source.shape(s_key), target.shape(t_key)
        if s is not None and t is not None and len(s) >= 2 and tuple(s) == tuple(t):
            by_shape.setdefault(tuple(s), []).append((s_key, t_key))
    total = sum(len(v) for v in by_shape.values())
    rows, done = [], 0
    for shape, pairs in by_shape.items():
        for start in range(0, len(pairs), engine.pairs_per_call):
            chunk = pairs[start:start + engine.pairs_per_call]
            k = settings.rank_for(shape)
            for (s_key, t_key), pair in zip(chunk, _inputs_of_pairs(engine, source, target, chunk, [k] * len(chunk))):
                sim = pair.similarity
                rows.append({"key": t_key, "source_key": s_key, "phi": sim.phi, "phi_right": sim.phi_right,
                             "chance": sim.chance, "chance_right": sim.chance_right, "phi_hat": sim.phi_hat,
                             "phi_hat_right": sim.phi_hat_right, "k": k,
                             "shape_source": list(shape), "shape_target": list(shape)})
            done += len(chunk)
            if progress:
                progress(done, total)
    rows.sort(key=lambda r: r["phi"])
    return rows
