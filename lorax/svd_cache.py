"""A size-bounded on-disk cache of SVD factors, so a second transfer onto the same model does no SVD.

Entries are keyed by the weight's content digest (:func:`lorax.fingerprint.weight_digest`) and
the SVD method — never by a file or layer name, which says nothing about the weights. One
safetensors file per entry, written atomically. Every read is validated (the container, the
metadata it claims, shapes, finiteness, orthonormal columns): a corrupt, truncated or stale
entry is deleted and reported as a miss, so it is recomputed and never trusted. When the folder
grows past ``max_bytes`` the least recently used entries (by modification time, which reads
refresh) are removed. Two small append-only text indexes sit beside the entries —
``identities.log`` (file identity → digest, to skip hashing) and ``scores.log`` (Φ̂ of layer
pairs by their digests, so a layer map is not rescored) — both mere shortcuts: a damaged or
missing line costs a recomputation, never a wrong result.

Factors from the fast methods are stored in float32 (their error is far above float32
rounding); ``exact`` factors keep float64 so the exact path stays exact.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Callable

import torch

from .errors import LoraxError
from .safetensors_io import atomic_save, check_safetensors_file, open_safetensors
from .svd import SVDFactors

log = logging.getLogger("lorax")

CACHE_VERSION = "1"
_SUFFIX = ".svd.safetensors"
#: Default size bound: a full SDXL pair at k = 320 (6.8 GB) or a Flux.1 pair (about 12 GB), with room to spare.
DEFAULT_MAX_BYTES = 16 << 30


class SVDCache:
    """See the module docstring. ``folder`` is created on first write."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = os.fspath(folder)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.rejected = 0  # entries found corrupt or stale and removed
        self._identities = _AppendLog(os.path.join(self.folder, "identities.log"), self._lock,
                                      lambda v: len(v) == 32)
        self._scores = _AppendLog(os.path.join(self.folder, "scores.log"), self._lock, _is_number)

    # The two text indexes of the module docstring (see _AppendLog).
    def digest_of_identity(self, identity: str) -> str | None:
        return self._identities.get(identity)

    def remember_identity(self, identity: str, digest: str) -> None:
        self._identities.put(identity, digest)

    def score_of(self, key: str) -> float | None:
        value = self._scores.get(key)
        return None if value is None else float(value)

    def remember_score(self, key: str, value: float) -> None:
        self._scores.put(key, repr(float(value)))

    def _path(self, digest: str, method: str) -> str:
        return os.path.join(self.folder, f"{digest}-{method}{_SUFFIX}")

    def get(self, digest: str, method: str, k: int) -> SVDFactors | None:
        path = self._path(digest, method)
        if not os.path.exists(path):
            return None
        try:
            factors = self._read(path, digest, method)
        except (LoraxError, OSError, ValueError, RuntimeError) as e:
            self.rejected += 1
            log.warning("LoRA-X: SVD cache entry %s is unusable (%s); recomputing", os.path.basename(path), e)
            self._remove(path)
            return None
        if factors.k < k:
            return None
        try:
            os.utime(path)  # least-recently-used bookkeeping
        except OSError:
            pass
        return factors

    def _read(self, path: str, digest: str, method: str) -> SVDFactors:
        header = check_safetensors_file(path)
        meta = header.get("__metadata__") or {}
        if meta.get("version") != CACHE_VERSION or meta.get("digest") != digest or meta.get("method") != method:
            raise ValueError("metadata does not match the requested weight")
        with open_safetensors(path) as f:
            U, S, V = f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("V")
        k = S.shape[0]
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != k or V.shape[1] != k:
            raise ValueError("inconsistent factor shapes")
        if not bool(torch.isfinite(S).all()):
            raise ValueError("non-finite singular values")
        tol = 1e-3 if U.dtype == torch.float32 else 1e-8
        # Every column must be a unit vector (O(mk), one pass over the entry, which is what a warm
        # run pays: a NaN or inf anywhere makes its column's norm fail the test as well, so no
        # separate finiteness pass). Orthogonality is spot-checked on a few columns (a full UᵀU
        # costs m·k² per entry, which made warm runs slower than reading).
        for X in (U, V):
            if not bool(((torch.linalg.vector_norm(X, dim=0) - 1).abs() <= tol).all()):
                raise ValueError("singular vectors are not finite unit vectors")
        cols = torch.unique(torch.linspace(0, k - 1, steps=min(k, 8)).round().long())
        eye = torch.eye(len(cols), dtype=U.dtype)
        if (U[:, cols].mT @ U[:, cols] - eye).abs().max() > tol or (V[:, cols].mT @ V[:, cols] - eye).abs().max() > tol:
            raise ValueError("singular vectors are not orthonormal")
        if k > 1 and bool((S[1:] > S[:-1] * (1 + tol)).any()):
            raise ValueError("singular values are not sorted")
        return SVDFactors(U, S, V)

    def put(self, digest: str, method: str, factors: SVDFactors) -> None:
        dtype = torch.float64 if method == "exact" else torch.float32
        tensors = {"U": factors.U.to("cpu", dtype), "S": factors.S.to("cpu", dtype), "V": factors.V.to("cpu", dtype)}
        meta = {"version": CACHE_VERSION, "digest": digest, "method": method, "k": str(factors.k)}
        with self._lock:
            try:
                atomic_save(tensors, self._path(digest, method), meta)
            except OSError as e:  # a full or read-only disk must not break a transfer
                log.warning("LoRA-X: could not write the SVD cache in %s (%s)", self.folder, e)
                return
            self._evict()

    def entries(self) -> list[tuple[str, int, float]]:
        """``(path, size, mtime)`` of every entry, oldest first."""
        out = []
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return out
        for name in names:
            if name.endswith(_SUFFIX):
                path = os.path.join(self.folder, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                out.append((path, st.st_size, st.st_mtime))
        out.sort(key=lambda e: e[2])
        return out

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _evict(self) -> None:
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries[:-1]:  # never evict the entry just written
            if total <= self.max_bytes:
                break
            self._remove(path)
            total -= size

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class _AppendLog:
    """``key<TAB>value`` lines appended to one file, read once (later lines win; damaged lines, or
    values ``valid`` rejects, are ignored). Only a convenience index: losing it costs recomputing."""

    def __init__(self, path: str, lock: threading.Lock, valid: Callable[[str], bool]):
        self.path, self._lock, self._valid = path, lock, valid
        self._items: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._items is None:
            items = {}
            try:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        parts = line.rstrip("\n").split("\t")
                        if len(parts) == 2 and self._valid(parts[1]):
                            items[parts[0]] = parts[1]
            except FileNotFoundError:
                pass
            self._items = items
        return self._items

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, value: str) -> None:
        if any(c in key or c in value for c in "\t\n"):
            return
        items = self._load()
        with self._lock:
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(f"{key}\t{value}\n")
            except OSError:
                return
            items[key] = value


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def cache_from_env(default_folder: str | os.PathLike) -> SVDCache | None:
    """The cache the user configured: ``LORAX_SVD_CACHE`` (a folder, or ``off``) and
    ``LORAX_SVD_CACHE_GB`` (size bound, default 16), else ``default_folder``."""
    setting = os.environ.get("LORAX_SVD_CACHE", "").strip()
    if setting.lower() in ("off", "0", "none", "false"):
        return None
    try:
        gigabytes = float(os.environ.get("LORAX_SVD_CACHE_GB", str(DEFAULT_MAX_BYTES >> 30)))
    except ValueError:
        raise LoraxError("LORAX_SVD_CACHE_GB must be a number of gigabytes") from None
    return SVDCache(setting or default_folder, max_bytes=int(gigabytes * (1 << 30)))
