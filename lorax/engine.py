"""The SVD engine: one place that decides how, where and how often weights are decomposed.

Transfers, similarity reports and training all ask the engine for the top-k factors of a weight.
It computes each (weight, k) at most once per process (memo keyed by the weight's content
digest, not its name), groups requests of one shape into batched calls, runs on the device it
was given (the GPU when there is one), and consults an optional on-disk
:class:`~lorax.svd_cache.SVDCache` so that a second transfer onto the same model does no SVD at
all. Factors are kept on the CPU between uses so a long run does not pile up device memory.

Precision: the fast methods round U and V to :attr:`SVDEngine.stored_dtype` (float16) as soon as
they are computed and use the rounded numbers from then on, whether or not a cache stores them —
so results do not depend on the cache being on, off, cold or warm, and the cache stores half the
bytes of float32 factors. The cost, measured by ``bench/cache_precision.py`` on power-law spectra
of SD/SDXL shapes, is at most 4.2e-4 relative on projected deltas (bfloat16: 8× more), below what
storing the weights in float16 already changes (1–4e-3, README "Performance"). ``exact`` keeps
float64 throughout.

How the work is spread depends on the device. On a GPU, weights of one shape go into one
batched call. On the CPU, batching gains nothing (LAPACK runs the batch one matrix after the
other) and a multi-threaded ``eigh``/``svd`` of one SD-sized matrix scales badly: measured on a
2-core machine, one 1280 × 1280 float64 ``eigh`` took 0.27 s on one thread and 0.34 s on two.
So on the CPU each weight is its own task, and ``workers`` tasks run side by side, each with a
single BLAS/OpenMP thread: 2.2× the throughput of the serial, multi-threaded loop there.

Routes by shape. With ``method="gram"`` (the default) the engine picks the decomposition per
layer: ``gram`` up to a smaller side of ``wide_from`` (default :data:`lorax.svd.WIDE_FROM`, 2048:
every SD1.5/SDXL layer), the ``subspace`` route above it (Flux, Qwen-Image, Z-Image, Wan 2.2),
whose cost grows with k instead of the width — within 2e-4 of the float64 SVD (2.8–3.7e-5
measured on their layers; its schedule adapts to the spectrum, 5–12 products), below what
float16 weights already change (:mod:`lorax.svd`, docs/performance.md). Factors are memoised,
cached and their similarities remembered under the route that made them
(:func:`lorax.svd.route_key`); a lookup only accepts an entry whose route is the one the layer's
shape and k select now, so changing the routing recomputes instead of mixing routes.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch

from .devices import float64_device
from .fingerprint import weight_digest
from .similarity import LayerSimilarity
from .svd import (WIDE_FROM, Method, SVDFactors, route_key, subspace_working_bytes, truncated_svd_batch,
                  wide_route)
from .weight_formats import dense_weight

#: How the fast methods keep U and V (module docstring): float16 keeps 3 more mantissa bits than
#: bfloat16 (8× less rounding) and unit vectors need none of bfloat16's range.
DEFAULT_STORED_DTYPE = torch.float16
#: Decompositions' working memory in flight at once (``max_batch_bytes``). 512 MiB lets two of the
#: widest layers (Wan 2.2's 13824 × 5120 ``ffn.0`` by the subspace route: 0.19 GB each) run side by side
#: on two cores; at 256 MiB Z-Image's layers went one at a time. Far below an 8 GB card or a 16 GB laptop.
DEFAULT_MAX_BATCH_BYTES = 512 << 20


def relative_change(source: torch.Tensor, target: torch.Tensor, block_bytes: int = 32 << 20) -> float:
    """``‖target − source‖_F / ‖source‖_F`` in float64, a block of rows at a time (no float64 copy of a
    whole layer); 0/0 counts as no change, x/0 as infinitely far."""
    a, b = source.reshape(source.shape[0], -1), target.reshape(target.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError(f"weight change needs weights of one shape, got {tuple(source.shape)} and "
                         f"{tuple(target.shape)}")
    step = max(1, block_bytes // (8 * max(1, a.shape[1])))
    diff = base = 0.0
    for i in range(0, a.shape[0], step):
        x, y = a[i:i + step].double(), b[i:i + step].to(device=a.device).double()
        diff += float(((y - x) ** 2).sum())
        base += float((x ** 2).sum())
    if base == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return (diff / base) ** 0.5


class FactorStore(Protocol):
    """What the engine needs of a persistent cache (the identity, score and origin methods are optional)."""

    def get(self, digest: str, method: str, k: int, stored_dtype: torch.dtype | None = None) -> SVDFactors | None: ...

    def put(self, digest: str, method: str, factors: SVDFactors, origin: str | None = None) -> None: ...


@dataclass
class EngineStats:
    """Counters for reports and for tests that prove the cache is used."""

    svd_calls: int = 0            # decomposition calls actually run (one per batch)
    layers_decomposed: int = 0    # weights decomposed (sum of batch sizes)
    memory_hits: int = 0
    disk_hits: int = 0
    seconds: float = 0.0          # wall time spent decomposing
    peak_batch_bytes: int = 0     # largest upcast input in flight at once (all workers together)
    peak_workers: int = 0         # most decompositions that ran side by side
    routes: dict = field(default_factory=dict)  # weights decomposed per route (lorax.svd.route_key)
    keys: list = field(default_factory=list)


class SVDEngine:
    """Cached, batched top-k SVDs (see the module docstring).

    ``method`` is ``"gram"`` (fast and accurate, the default: ``gram`` or, for layers whose smaller
    side is at least ``wide_from``, ``subspace``; module docstring), ``"randomized"`` (float32, for
    devices with slow float64), ``"subspace"`` (every layer it saves time on) or ``"exact"``
    (float64 full SVD, the reference). ``wide_from=None`` keeps ``gram`` for every shape.
    ``device`` is where the arithmetic runs. ``batch_size`` bounds how many weights of one shape
    go into one call (GPU, or ``workers=1``), ``workers`` how many single-threaded
    decompositions run side by side on the CPU (default: ``torch.get_num_threads()``), and
    ``max_batch_bytes`` the upcast weights in flight at once either way, so memory stays at a
    few layers. ``memory_bytes`` bounds the in-process memo of factors (least recently used
    are dropped first; the on-disk store keeps them). Factors of the fast methods are kept in
    float32 after rounding U and V to ``stored_dtype`` (default float16; float64 for ``exact``,
    module docstring), so a warm run returns exactly what the cold run did.
    """

    def __init__(self, method: Method = "gram", device: torch.device | str | None = None,
                 store: FactorStore | None = None, batch_size: int = 8, memory_bytes: int = 256 << 20,
                 seed: int = 0, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES, workers: int | None = None,
                 stored_dtype: torch.dtype | None = None, wide_from: int | None = WIDE_FROM):
        self.method = method
        self.wide_from = None if wide_from is None else int(wide_from)
        if stored_dtype is None:
            stored_dtype = torch.float64 if method == "exact" else DEFAULT_STORED_DTYPE
        if stored_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"stored_dtype must be a floating-point dtype of 16 to 64 bits, got {stored_dtype}")
        self.stored_dtype = stored_dtype
        #: The device asked for, and the one the decompositions run on: the same, except on a
        #: device without float64 (Apple MPS, DirectML), where the float64 routes run on the CPU
        #: (:mod:`lorax.devices`). The float32 randomized route stays on the device.
        self.requested_device = torch.device(device) if device is not None else torch.device("cpu")
        self.device = (self.requested_device if method == "randomized"
                       else float64_device(self.requested_device))
        self.store = store
        self.batch_size = max(1, int(batch_size))
        self.max_batch_bytes = int(max_batch_bytes)
        self.memory_bytes = int(memory_bytes)
        self.workers = None if workers is None else max(1, int(workers))
        self.seed = seed
        self.stats = EngineStats()
        self._memo: OrderedDict[tuple[str, str], SVDFactors] = OrderedDict()
        self._memo_bytes = 0
        self._identities: dict[str, str] = {}
        self._similarities: dict[str, tuple[float, ...]] = {}
        self._lock = threading.Lock()
        #: Factors kept whatever the memo's bound while :meth:`holding` their origin (U, V as stored).
        self._held: dict[tuple[str, str], SVDFactors] = {}
        self._held_origins: dict[str, int] = {}

    @property
    def factor_dtype(self) -> torch.dtype:
        """The dtype factors are kept and returned in."""
        return torch.float64 if self.method == "exact" or self.stored_dtype == torch.float64 else torch.float32

    def rounded(self, factors: SVDFactors) -> SVDFactors:
        """``factors`` as stored: U and V in ``stored_dtype``, σ in the compute dtype (on the CPU)."""
        return SVDFactors(factors.U.to("cpu", self.stored_dtype, copy=True),
                          factors.S.to("cpu", self.factor_dtype, copy=True),
                          factors.V.to("cpu", self.stored_dtype, copy=True))

    def _note_origin(self, digest: str, origin: str | None) -> None:
        if origin and self.store is not None and hasattr(self.store, "note_origin"):
            self.store.note_origin(digest, origin)

    @property
    def pairs_per_call(self) -> int:
        """How many (source, target) layer pairs a transfer should ask for at once: a batch on a
        GPU; on the CPU one pair per worker, so only the weights being decomposed are in memory
        (8 pairs of SDXL's 10240 × 1280 layers are 0.4 GB of float16 alone)."""
        workers = self._parallel_workers()
        return self.batch_size if workers == 1 else workers

    def _parallel_workers(self) -> int:
        if self.device.type != "cpu":
            return 1
        return self.workers if self.workers is not None else max(1, torch.get_num_threads())

    def route_for(self, shape: Sequence[int], k: int) -> str:
        """The method a weight of ``shape`` is decomposed with at rank ``k`` (module docstring)."""
        if self.method == "gram" and wide_route(shape, k, self.wide_from):
            return "subspace"
        if self.method == "subspace" and not wide_route(shape, k, 1):
            return "gram"  # the subspace route would save nothing at this k
        return self.method

    def _route_keys(self) -> tuple[str, ...]:
        """The names this engine's factors may be found under, the wide route first (a layer's
        shape is not known before its factors are found)."""
        if self.method == "gram" and self.wide_from is not None or self.method == "subspace":
            return (route_key("subspace"), "gram")
        return (self.method,)

    @contextlib.contextmanager
    def holding(self, origin: str | None) -> Iterator[None]:
        """Keep the factors of the weights of ``origin`` (the model a request names, see
        :meth:`factors_many`) in memory until the block ends, whatever the memo's bound and
        whether or not there is a store: so that one source can be moved onto several targets in
        a row (Wan 2.2's two experts) and be decomposed — and read from the store — only once.

        The memo alone does not do it: it keeps the last 256 MiB of factors, and a LoRA on every
        linear layer of a Wan 14B model needs about 6 GB of source factors at k = 320 (float32),
        so without a store the second target would decompose the source again. Held factors are
        kept as stored (U and V in ``stored_dtype``: about 3 GB for that LoRA) and dropped when
        the last hold on them ends. Blocks may nest; ``None`` holds nothing.
        """
        if origin is None:
            yield
            return
        with self._lock:
            self._held_origins[origin] = self._held_origins.get(origin, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._held_origins[origin] -= 1
                if not self._held_origins[origin]:
                    del self._held_origins[origin]
                if not self._held_origins:
                    self._held.clear()

    @property
    def held_bytes(self) -> int:
        """Bytes of factors :meth:`holding` keeps now."""
        return sum(_nbytes(f) for f in self._held.values())

    def _hold(self, digest: str, origin: str | None, factors: SVDFactors, name: str) -> None:
        if origin is None or origin not in self._held_origins:
            return
        key = (digest, name)
        with self._lock:
            old = self._held.get(key)
            if old is None or old.k < factors.k:
                self._held[key] = self.rounded(factors)  # exact: the factors were rounded to these dtypes

    def _lookup(self, digest: str, k: int) -> SVDFactors | None:
        for name in self._route_keys():
            f = self._lookup_as(digest, k, name)
            if f is not None:
                return f
        return None

    def _lookup_as(self, digest: str, k: int, name: str) -> SVDFactors | None:
        """Factors found under the route ``name``, if that is the route this engine takes for their
        shape at rank ``k`` now; another route's (a changed ``wide_from``, another iteration count:
        another name) are not used, but recomputed."""
        key = (digest, name)
        with self._lock:
            held = self._held.get(key)
            if held is not None and held.k >= k and self._route_matches(held, k, name):
                self.stats.memory_hits += 1
                return held.top(k).to(dtype=self.factor_dtype)
            f = self._memo.get(key)
            if f is not None and f.k >= k and self._route_matches(f, k, name):
                self._memo.move_to_end(key)
                self.stats.memory_hits += 1
                return f.top(k)
        if self.store is not None:
            f = self.store.get(digest, name, k, stored_dtype=self.stored_dtype)
            if f is not None and self._route_matches(f, k, name):
                self.stats.disk_hits += 1
                self._remember(digest, f, name)
                return f.top(k)
        return None

    def _route_matches(self, factors: SVDFactors, k: int, name: str) -> bool:
        return route_key(self.route_for(factors.shape, k)) == name

    def _remember(self, digest: str, factors: SVDFactors, name: str) -> None:
        with self._lock:
            key = (digest, name)
            old = self._memo.get(key)
            if old is None or old.k < factors.k:
                if old is not None:
                    self._memo_bytes -= _nbytes(old)
                self._memo[key] = factors
                self._memo_bytes += _nbytes(factors)
            self._memo.move_to_end(key)
            while self._memo_bytes > self.memory_bytes and len(self._memo) > 1:
                _, dropped = self._memo.popitem(last=False)
                self._memo_bytes -= _nbytes(dropped)

    def cache_counters(self) -> tuple[int, int, int]:
        """``(disk hits, layers decomposed, bytes read from the store)`` so far: a report takes them
        before and after a run to say what that run did (the engine lives for the whole process)."""
        return (self.stats.disk_hits, self.stats.layers_decomposed, int(getattr(self.store, "bytes_read", 0)))

    def cache_note(self, before: tuple[int, int, int] = (0, 0, 0)) -> str:
        """One line for reports on the store since ``before`` (:meth:`cache_counters`)."""
        from .svd_cache import cache_summary

        hits, decomposed, read = (a - b for a, b in zip(self.cache_counters(), before))
        return "SVD cache: " + cache_summary(self.store, hits, decomposed, read)

    @property
    def memo_bytes(self) -> int:
        """Bytes of factors the in-process memo holds now."""
        return self._memo_bytes

    def factors(self, weight: torch.Tensor, k: int, digest: str | None = None) -> SVDFactors:
        """Top-k factors of one weight."""
        return self.factors_many([(weight, k)], digests=[digest])[0]

    def known_digest(self, identity: str | None) -> str | None:
        """The content digest of a weight seen before under ``identity`` (nothing is read)."""
        if identity is None:
            return None
        digest = self._identities.get(identity)
        if digest is None and self.store is not None and hasattr(self.store, "digest_of_identity"):
            digest = self.store.digest_of_identity(identity)
        return digest

    def _remember_identity(self, identity: str | None, digest: str) -> None:
        if identity is None or self._identities.get(identity) == digest:
            return
        self._identities[identity] = digest
        if self.store is not None and hasattr(self.store, "remember_identity"):
            self.store.remember_identity(identity, digest)

    def digest_of(self, weight: torch.Tensor | Callable[[], torch.Tensor],
                  identity: str | None = None) -> tuple[str, torch.Tensor | Callable[[], torch.Tensor]]:
        """The weight's content digest, and the weight to hand on: found through ``identity``
        without reading anything when it was seen before (the loader is handed back unread),
        otherwise read and hashed (the dense weight is handed back, so nothing is read twice)."""
        digest = self.known_digest(identity)
        if digest is not None:
            return digest, weight
        weight = dense_weight(weight() if callable(weight) else weight)
        digest = weight_digest(weight)
        self._remember_identity(identity, digest)
        return digest, weight

    def _similarity_key(self, digests: Sequence[str], k: int) -> str:
        # The routing is part of what fixes the factors (a layer's shape is not known here): the
        # wide-route policy is named unless every layer takes the one method.
        keys = self._route_keys()
        tag = self.method if len(keys) == 1 else f"{self.method}|{keys[0]}>={self.wide_from or 1}"
        return ":".join(["similarity", tag, str(k), *digests])

    def similarity_of(self, digests: Sequence[str], k: int) -> LayerSimilarity | None:
        """The similarity of the layers with these (source, target) digests at rank ``k``, computed
        before from their factors — by this process or, through the store, by an earlier one — or
        None. It is a function of the two factor sets alone, which the digests and the method fix,
        so remembering it changes no result; it spares a transfer the ``(m + n)·k²`` products of Φ
        and, when the projection needs only the target's factors, reading the source's."""
        key = self._similarity_key(digests, k)
        values = self._similarities.get(key)
        if values is None and self.store is not None and hasattr(self.store, "scores_of"):
            values = self.store.scores_of(key)
            if values is not None:
                self._similarities[key] = values
        if values is None or len(values) != 4:  # a line of another layout: computed again
            return None
        return LayerSimilarity.from_scores(*values, k=k)

    def weight_change(self, source: torch.Tensor | Callable[[], torch.Tensor],
                      target: torch.Tensor | Callable[[], torch.Tensor],
                      identities: tuple[str | None, str | None] = (None, None)) -> float:
        """``‖W_t − W_s‖_F / ‖W_s‖_F`` of two weights of one shape (0 for identical contents).

        Needs no decomposition, only the two weights, in float64 a block of rows at a time. Remembered
        like a similarity, by the two content digests, so a warm run whose digests are known through
        the weights' identities reads neither weight again."""
        ds, ws = self.digest_of(source, identities[0])
        dt, wt = self.digest_of(target, identities[1])
        if ds == dt:
            return 0.0
        key = f"change:{ds}:{dt}"
        known = self._similarities.get(key)
        if known is None and self.store is not None and hasattr(self.store, "scores_of"):
            known = self.store.scores_of(key)
        if known is not None and len(known) == 1:
            return float(known[0])
        ws = dense_weight(ws() if callable(ws) else ws)
        wt = dense_weight(wt() if callable(wt) else wt)
        value = relative_change(ws, wt)
        self._similarities[key] = (value,)
        if self.store is not None and hasattr(self.store, "remember_scores"):
            self.store.remember_scores(key, (value,))
        return value

    def remember_similarity(self, digests: Sequence[str], sim: LayerSimilarity) -> None:
        key = self._similarity_key(digests, sim.k)
        values = sim.scores()
        if self._similarities.get(key) == values:
            return
        self._similarities[key] = values
        if self.store is not None and hasattr(self.store, "remember_scores"):
            self.store.remember_scores(key, values)

    @torch.no_grad()
    def factors_many(self, requests: Sequence[tuple[torch.Tensor | Callable[[], torch.Tensor], int]],
                     digests: Sequence[str | None] | None = None,
                     identities: Sequence[str | None] | None = None,
                     origins: Sequence[str | None] | None = None) -> list[SVDFactors]:
        """Top-k factors for each ``(weight, k)``; misses are decomposed batched by shape, or side
        by side on the CPU (module docstring), and all of them before this returns.

        A weight may be given as a zero-argument callable that loads it, so that cached layers
        are never read at all when their digest is known: given directly, or through an
        ``identity`` — a string that changes whenever the bytes may have (a file's path, size,
        mtime and inode plus the tensor's header entry) — seen before. That spares a warm run
        from reading and hashing gigabytes of weights just to find their cache entries.
        ``origins`` name the model each weight belongs to (a file path or a label), recorded by the
        store so that its contents can be listed and cleared by model.
        """
        digests = list(digests) if digests is not None else [None] * len(requests)
        identities = list(identities) if identities is not None else [None] * len(requests)
        origins = list(origins) if origins is not None else [None] * len(requests)
        out: list[SVDFactors | None] = [None] * len(requests)
        pending: dict[tuple, list[tuple[int, torch.Tensor, str, int, str | None]]] = {}
        pending_bytes = 0
        for i, ((weight, k), digest, identity, origin) in enumerate(zip(requests, digests, identities, origins)):
            if digest is None:
                digest, weight = self.digest_of(weight, identity)
            hit = self._lookup(digest, k)
            if hit is not None:
                out[i] = hit
                self._note_origin(digest, origin)
                self._hold(digest, origin, hit, route_key(self.route_for(hit.shape, k)))
                continue
            # Whatever the caller handed in, the engine decomposes the matrix the model computes
            # with: quantized and GGUF weights are dequantized here (lorax.weight_formats).
            weight = dense_weight(weight() if callable(weight) else weight)
            # Grouped by shape and route, so each weight is decomposed by the route its own k selects.
            route = self.route_for(tuple(weight.shape), k)
            pending.setdefault((tuple(weight.shape), route), []).append((i, weight, digest, k, origin))
            # Misses are decomposed as soon as their stored weights fill max_batch_bytes, so a long
            # request (a layer map asks for a whole role at once) never holds all its weights.
            pending_bytes += weight.nbytes
            if pending_bytes >= self.max_batch_bytes:
                self._decompose_pending(pending, out)
                pending, pending_bytes = {}, 0
        self._decompose_pending(pending, out)
        return out  # type: ignore[return-value]

    def _decompose_pending(self, pending: dict[tuple, list], out: list) -> None:
        """Decompose the missed weights (grouped by shape), keep and store their factors, fill ``out``."""
        workers = self._parallel_workers()
        batches = []
        for (_, route), items in pending.items():
            # Bound the memory in flight: a batch holds each weight upcast (8 bytes an element)
            # plus its Gram matrix and factors, so big layers go fewer at a time.
            per_item = self._upcast_bytes(items[0][1], route, max(it[3] for it in items))
            step = 1 if workers > 1 else max(1, min(self.batch_size, self.max_batch_bytes // per_item))
            batches += [(route, items[start:start + step]) for start in range(0, len(items), step)]
        if not batches:
            return

        def in_flight(batch) -> int:
            route, items = batch
            return len(items) * self._upcast_bytes(items[0][1], route, max(it[3] for it in items))

        # Largest first, so the last task to finish is a small one.
        batches.sort(key=lambda b: -in_flight(b))
        side_by_side = min(workers, len(batches), max(1, self.max_batch_bytes // in_flight(batches[0])))
        t0 = time.perf_counter()
        if side_by_side > 1:
            with _one_thread_each(), ThreadPoolExecutor(side_by_side, initializer=torch.set_num_threads,
                                                        initargs=(1,)) as pool:
                results = list(pool.map(self._decompose, batches))
        else:
            results = [self._decompose(b) for b in batches]
        # Rounded to the stored precision (module docstring) and copied by this thread, not the
        # workers: factors that outlive the call must not sit in a worker's malloc arena, where they
        # would pin the freed buffers around them.
        results = [[self.rounded(f) for f in fs] for fs in results]
        if self.device.type == "cpu":
            _return_freed_memory()
        self.stats.seconds += time.perf_counter() - t0
        self.stats.peak_workers = max(self.stats.peak_workers, side_by_side)
        self.stats.peak_batch_bytes = max(self.stats.peak_batch_bytes,
                                          max(in_flight(b) for b in batches) * side_by_side)
        for (route, chunk), factors in zip(batches, results):
            name = route_key(route)
            self.stats.routes[name] = self.stats.routes.get(name, 0) + len(chunk)
            self.stats.svd_calls += 1
            self.stats.layers_decomposed += len(chunk)
            for (i, _, digest, k_i, origin), stored in zip(chunk, factors):
                f = stored.to(dtype=self.factor_dtype)  # the numbers a warm run reads back
                self._remember(digest, f, name)
                self._hold(digest, origin, stored, name)
                if self.store is not None:
                    self.store.put(digest, name, stored, origin=origin)
                out[i] = f.top(k_i)

    def _upcast_bytes(self, weight: torch.Tensor, route: str | None = None, k: int = 0) -> int:
        """Bytes one decomposition holds beyond the stored weight: its float64 copy (the Gram route
        streams, but the exact fallback does not), or the ``subspace`` route's own working memory
        (:func:`lorax.svd.subspace_working_bytes`)."""
        if route == "subspace":
            return max(1, subspace_working_bytes(tuple(weight.shape), k))
        return max(1, (4 if (route or self.method) == "randomized" else 8) * weight.numel())

    @torch.no_grad()
    def _decompose(self, batch) -> list[SVDFactors]:
        """One call for weights of one shape and route. Runs on worker threads, where grad mode is
        the thread's own (enabled by default): hence the decorator here too, not only on the caller."""
        route, chunk = batch
        k = max(item[3] for item in chunk)
        return truncated_svd_batch([item[1] for item in chunk], k, method=route, device=self.device,
                                   seed=self.seed)


_LIBC = None


def _return_freed_memory() -> None:
    """Give the heap memory the decompositions freed back to the operating system.

    Float64 copies, Gram matrices and factors are mostly below glibc's mmap threshold, so freed
    they stay in the malloc arenas of the worker threads and of the caller, pinned by the factors
    kept around them. Measured on an SD1.5-shaped cold transfer (512 MB memo): peak extra RSS
    1.65 GB without this, 1.3 GB with it, at no measurable cost. Factors that outlive the call
    are copied by the calling thread for the same reason. glibc only; a no-op elsewhere.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - raises AttributeError on a libc without it
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _nbytes(f: SVDFactors) -> int:
    return f.U.nbytes + f.S.nbytes + f.V.nbytes


@contextlib.contextmanager
def _one_thread_each() -> Iterator[None]:
    """Single-threaded BLAS/OpenMP while decompositions run side by side (restored after).

    ``torch.set_num_threads`` is process-wide for MKL and per-thread for OpenMP, so the pool's
    threads set it too (their initializer) and the caller's setting comes back at the end.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
