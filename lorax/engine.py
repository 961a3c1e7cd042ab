"""The SVD engine: one place that decides how, where and how often weights are decomposed.

Transfers, similarity reports and training all ask the engine for the top-k factors of a weight.
It computes each (weight, k) at most once per process (memo keyed by the weight's content
digest, not its name), groups requests of one shape into batched calls, runs on the device it
was given (the GPU when there is one), and consults an optional on-disk
:class:`~lorax.svd_cache.SVDCache` so that a second transfer onto the same model does no SVD at
all. Factors are kept on the CPU between uses so a long run does not pile up device memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from .fingerprint import weight_digest
from .svd import Method, SVDFactors, truncated_svd_batch


class FactorStore(Protocol):
    """What the engine needs of a persistent cache (identity methods are optional)."""

    def get(self, digest: str, method: str, k: int) -> SVDFactors | None: ...

    def put(self, digest: str, method: str, factors: SVDFactors) -> None: ...


@dataclass
class EngineStats:
    """Counters for reports and for tests that prove the cache is used."""

    svd_calls: int = 0            # batched decompositions actually run
    layers_decomposed: int = 0    # weights decomposed (sum of batch sizes)
    memory_hits: int = 0
    disk_hits: int = 0
    seconds: float = 0.0
    peak_batch_bytes: int = 0
    keys: list = field(default_factory=list)


class SVDEngine:
    """Cached, batched top-k SVDs (see the module docstring).

    ``method`` is ``"gram"`` (fast and accurate, the default), ``"randomized"`` (float32, for
    devices with slow float64) or ``"exact"`` (float64 full SVD, the reference).
    ``device`` is where the arithmetic runs; ``batch_size`` bounds how many weights of one shape
    are decomposed together, and ``max_batch_bytes`` the upcast weights of one batch (so the
    memory in flight stays at a few layers). ``memory_items`` bounds the in-process
    memo (least recently used factors are dropped first).
    """

    def __init__(self, method: Method = "gram", device: torch.device | str | None = None,
                 store: FactorStore | None = None, batch_size: int = 8, memory_items: int = 4096,
                 seed: int = 0, max_batch_bytes: int = 256 << 20):
        self.method = method
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.store = store
        self.batch_size = max(1, int(batch_size))
        self.max_batch_bytes = int(max_batch_bytes)
        self.memory_items = memory_items
        self.seed = seed
        self.stats = EngineStats()
        self._memo: OrderedDict[tuple[str, str], SVDFactors] = OrderedDict()
        self._identities: dict[str, str] = {}
        self._lock = threading.Lock()

    def _lookup(self, digest: str, k: int) -> SVDFactors | None:
        key = (digest, self.method)
        with self._lock:
            f = self._memo.get(key)
            if f is not None and f.k >= k:
                self._memo.move_to_end(key)
                self.stats.memory_hits += 1
                return f.top(k)
        if self.store is not None:
            f = self.store.get(digest, self.method, k)
            if f is not None:
                self.stats.disk_hits += 1
                self._remember(digest, f)
                return f.top(k)
        return None

    def _remember(self, digest: str, factors: SVDFactors) -> None:
        with self._lock:
            key = (digest, self.method)
            old = self._memo.get(key)
            if old is None or old.k < factors.k:
                self._memo[key] = factors
            self._memo.move_to_end(key)
            while len(self._memo) > self.memory_items:
                self._memo.popitem(last=False)

    def factors(self, weight: torch.Tensor, k: int, digest: str | None = None) -> SVDFactors:
        """Top-k factors of one weight."""
        return self.factors_many([(weight, k)], digests=[digest])[0]

    def _digest_of_identity(self, identity: str | None) -> str | None:
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

    def factors_many(self, requests: Sequence[tuple[torch.Tensor | Callable[[], torch.Tensor], int]],
                     digests: Sequence[str | None] | None = None,
                     identities: Sequence[str | None] | None = None) -> list[SVDFactors]:
        """Top-k factors for each ``(weight, k)``; misses of one shape are decomposed together.

        A weight may be given as a zero-argument callable that loads it, so that cached layers
        are never read at all when their digest is known: given directly, or through an
        ``identity`` — a string that changes whenever the bytes may have (a file's path, size,
        mtime and inode plus the tensor's header entry) — seen before. That spares a warm run
        from reading and hashing gigabytes of weights just to find their cache entries.
        """
        import time

        digests = list(digests) if digests is not None else [None] * len(requests)
        identities = list(identities) if identities is not None else [None] * len(requests)
        out: list[SVDFactors | None] = [None] * len(requests)
        pending: dict[tuple, list[tuple[int, torch.Tensor, str, int]]] = {}
        for i, ((weight, k), digest, identity) in enumerate(zip(requests, digests, identities)):
            if digest is None:
                digest = self._digest_of_identity(identity)
            if digest is None:
                weight = weight() if callable(weight) else weight
                digest = weight_digest(weight)
                self._remember_identity(identity, digest)
            hit = self._lookup(digest, k)
            if hit is not None:
                out[i] = hit
                continue
            weight = weight() if callable(weight) else weight
            pending.setdefault(tuple(weight.shape), []).append((i, weight, digest, k))
        for shape, items in pending.items():
            # Bound the memory in flight: a batch holds each weight upcast (8 bytes an element)
            # plus its Gram matrix and factors, so big layers go fewer at a time.
            elem = 4 if self.method == "randomized" else 8
            per_item = elem * items[0][1].numel()
            step = max(1, min(self.batch_size, self.max_batch_bytes // max(1, per_item)))
            for start in range(0, len(items), step):
                chunk = items[start:start + step]
                k = max(item[3] for item in chunk)
                t0 = time.perf_counter()
                results = truncated_svd_batch([item[1] for item in chunk], k, method=self.method,
                                              device=self.device, seed=self.seed)
                self.stats.seconds += time.perf_counter() - t0
                self.stats.svd_calls += 1
                self.stats.layers_decomposed += len(chunk)
                self.stats.peak_batch_bytes = max(self.stats.peak_batch_bytes, len(chunk) * per_item)
                for (i, _, digest, k_i), f in zip(chunk, results):
                    f = f.to(device="cpu")
                    self._remember(digest, f)
                    if self.store is not None:
                        self.store.put(digest, self.method, f)
                    out[i] = f.top(k_i)
        return out  # type: ignore[return-value]
