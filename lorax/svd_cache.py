"""A size-bounded on-disk cache of SVD factors, so a second transfer onto the same model does no SVD.

Entries are keyed by the weight's content digest (:func:`lorax.fingerprint.weight_digest`) and
the SVD method — never by a file or layer name, which says nothing about the weights. One
safetensors file per entry, written atomically. Every read is validated (the container, the
metadata it claims, shapes, finiteness, orthonormal columns): a corrupt, truncated or stale
entry is deleted and reported as a miss, so it is recomputed and never trusted. When the folder
grows past ``max_bytes`` the least recently used entries (by modification time, which reads
refresh) are removed. Three small append-only text indexes sit beside the entries —
``identities.log`` (file identity → digest, to skip hashing), ``scores.log`` (the similarity of
layer pairs by their digests, so neither a transfer nor a layer map recomputes it) and
``origins.log`` (digest → the model it was read from, for :meth:`SVDCache.models` and
``python -m lorax cache``) — all mere shortcuts or labels: a damaged or missing line costs a
recomputation or an "unknown model", never a wrong result.

Precision. The engine decides it (:attr:`lorax.engine.SVDEngine.stored_dtype`) and rounds its
factors *before* using them, so a cold run and a warm run compute with the same numbers; the
cache writes what it is given. The fast methods store ``U`` and ``V`` in float16 and ``σ`` in
float32 (k numbers: nothing to save there), half of the float32 entries of cache version 1; the
rounding changes projected deltas by at most 4.2e-4 relative (bench/cache_precision.py), below the 1–4e-3 that storing the
weights themselves in float16 already causes (README, Defaults). ``exact`` keeps float64. Entries
are returned upcast to float32 (float64 for ``exact``), the dtype the projections compute in.

Why both sides' vectors are stored although ``V = WᵀU/σ`` could be recomputed from ``U``: that needs
the weight, and reading the weight (m·n numbers) costs more than reading ``V`` (n·k numbers, k at most
half of m) — a warm run would read twice the bytes it saves and add an m·n·k product per layer.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import LoraxError
from .safetensors_io import atomic_save, check_safetensors_file, open_safetensors
from .svd import SVDFactors

log = logging.getLogger("lorax")

#: Version 2: U and V at the engine's stored precision (float16 for the fast methods), with an
#: ``origin``; version 1 entries (float32) are outdated: dropped quietly when met and recomputed.
CACHE_VERSION = "2"
_SUFFIX = ".svd.safetensors"
_LOGS = ("identities.log", "scores.log", "origins.log")
#: Default size bound: the factors of ten SDXL checkpoints at k = 320 with a LoRA on every
#: layer (1.7 GB each with float16 vectors), or five Flux.1 models (3.1 GB each); docs/cache.md.
DEFAULT_MAX_BYTES = 16 << 30
#: Label of entries whose model is not known (written by version 1, or weights given in memory).
UNKNOWN_MODEL = "(model not recorded)"


def _unit_tolerance(dtype: torch.dtype) -> float:
    """How far a stored column's norm (and a spot-checked inner product) may be from 1 (0).

    Rounding each entry of a unit vector to a format with unit roundoff u changes its norm by at
    most u and an inner product of two of them by at most 2u + u²; 2.5u leaves a margin above that
    bound and stays far below any damage worth catching (a scaled column, a repeated one: ≥ 0.5).
    float32 keeps the version-1 tolerance (1e-3: randomized factors are computed in float32),
    float64 (``exact``) 1e-8.
    """
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        return 1e-3
    return 2.5 * torch.finfo(dtype).eps / 2


class _Outdated(Exception):
    """An entry of another cache version: not damage, just recomputed (quietly)."""


@dataclass
class ModelUsage:
    """What the cache holds for one model (see :meth:`SVDCache.models`)."""

    model: str
    entries: int = 0
    bytes: int = 0
    last_used: float = 0.0
    shared: int = 0   # entries that also belong to another model (counted under each)
    paths: list = field(default_factory=list)


class SVDCache:
    """See the module docstring. ``folder`` is created on first write."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = os.fspath(folder)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.rejected = 0  # entries found corrupt or stale and removed
        self.bytes_read = 0  # bytes of entries read by hits (what a warm run costs in reads)
        self.bytes_written = 0
        self.write_error: str | None = None  # why the last write failed (shown once in reports)
        self._identities = _AppendLog(os.path.join(self.folder, "identities.log"), self._lock,
                                      lambda v: len(v) == 32)
        self._scores = _AppendLog(os.path.join(self.folder, "scores.log"), self._lock, _are_numbers)
        self._origins = _AppendLog(os.path.join(self.folder, "origins.log"), self._lock, bool)

    # The text indexes of the module docstring (see _AppendLog).
    def digest_of_identity(self, identity: str) -> str | None:
        return self._identities.get(identity)

    def remember_identity(self, identity: str, digest: str) -> None:
        self._identities.put(identity, digest)

    def scores_of(self, key: str) -> tuple[float, ...] | None:
        value = self._scores.get(key)
        return None if value is None else tuple(float(v) for v in value.split(","))

    def remember_scores(self, key: str, values) -> None:
        self._scores.put(key, ",".join(repr(float(v)) for v in values))

    def note_origin(self, digest: str, origin: str) -> None:
        """Record that the weight with ``digest`` belongs to the model ``origin`` (a file path or a
        label): one line per new (digest, model) pair, so listing by model needs no entry opened."""
        self._origins.put(f"{digest}|{origin}", "1")

    def origins_of(self) -> dict[str, set[str]]:
        """digest → the models its weight was read from."""
        out: dict[str, set[str]] = {}
        for key, value in self._origins.items():
            digest, _, origin = key.partition("|")
            if origin and value == "1":  # "0": the model's entries were cleared (see clear)
                out.setdefault(digest, set()).add(origin)
        return out

    def _path(self, digest: str, method: str) -> str:
        return os.path.join(self.folder, f"{digest}-{method}{_SUFFIX}")

    def get(self, digest: str, method: str, k: int, stored_dtype: torch.dtype | None = None) -> SVDFactors | None:
        """The entry's factors upcast to float32 (float64 if stored so), or None. An entry stored at
        another precision than ``stored_dtype`` (when given) is a miss: the engine's rounding
        differs, so its numbers would not be the ones a cold run computes (the put overwrites it)."""
        path = self._path(digest, method)
        if not os.path.exists(path):
            return None
        try:
            factors, size = self._read(path, digest, method, stored_dtype)
        except _Outdated:
            self._remove(path)
            return None
        except (LoraxError, OSError, ValueError, RuntimeError) as e:
            self.rejected += 1
            log.warning("LoRA-X: SVD cache entry %s is unusable (%s); recomputing", os.path.basename(path), e)
            self._remove(path)
            return None
        if factors is None or factors.k < k:
            return None
        self.bytes_read += size
        try:
            os.utime(path)  # least-recently-used bookkeeping
        except OSError:
            pass
        return factors

    def _read(self, path: str, digest: str, method: str, stored_dtype: torch.dtype | None):
        header = check_safetensors_file(path)
        meta = header.get("__metadata__") or {}
        if meta.get("version") != CACHE_VERSION:
            raise _Outdated()
        if meta.get("digest") != digest or meta.get("method") != method:
            raise ValueError("metadata does not match the requested weight")
        if stored_dtype is not None and header.get("U", {}).get("dtype") != _SAFETENSORS_DTYPES.get(stored_dtype):
            return None, 0
        with open_safetensors(path) as f:
            U, S, V = f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("V")
        if U.dtype != V.dtype or not U.is_floating_point() or not S.is_floating_point():
            raise ValueError("inconsistent factor dtypes")
        tol = _unit_tolerance(U.dtype)
        compute = torch.float64 if U.dtype == torch.float64 else torch.float32
        U, S, V = U.to(compute), S.to(compute), V.to(compute)
        k = S.shape[0]
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != k or V.shape[1] != k:
            raise ValueError("inconsistent factor shapes")
        if not bool(torch.isfinite(S).all()):
            raise ValueError("non-finite singular values")
        # Every column must be a unit vector (O(mk), one pass over the entry, which is what a warm
        # run pays: a NaN or inf anywhere makes its column's norm fail the test as well, so no
        # separate finiteness pass). Orthogonality is spot-checked on a few columns (a full UᵀU
        # costs m·k² per entry, which made warm runs slower than reading).
        # Squared norms as a plain product and column sum: ``vector_norm(X, dim=0)`` of these row-major
        # matrices was 15–20× slower (20–30 ms for a 10240 × 320 entry) and took most of a warm run's
        # CPU time. ``|‖x‖ − 1| ≤ tol`` is ``|‖x‖² − 1| ≤ tol·(2 + tol)``.
        for X in (U, V):
            if not bool(((_column_sq_norms(X) - 1).abs() <= tol * (2 + tol)).all()):
                raise ValueError("singular vectors are not finite unit vectors")
        for X in (U, V):
            spot = _spot_columns(X)
            if (spot.mT @ spot - torch.eye(spot.shape[1], dtype=X.dtype)).abs().max() > tol:
                raise ValueError("singular vectors are not orthonormal")
        if k > 1 and bool((S[1:] > S[:-1] * (1 + 1e-6)).any()):
            raise ValueError("singular values are not sorted")
        return SVDFactors(U, S, V), os.path.getsize(path)

    def put(self, digest: str, method: str, factors: SVDFactors, origin: str | None = None) -> None:
        """Store ``factors`` as they are given (the engine has rounded them to its stored precision)."""
        tensors = {"U": factors.U.to("cpu"), "S": factors.S.to("cpu"), "V": factors.V.to("cpu")}
        meta = {"version": CACHE_VERSION, "digest": digest, "method": method, "k": str(factors.k),
                "dtype": str(factors.U.dtype).removeprefix("torch.")}
        path = self._path(digest, method)
        with self._lock:
            try:
                atomic_save(tensors, path, meta)
                self.bytes_written += os.path.getsize(path)
            except OSError as e:  # a full or read-only disk must not break a transfer
                if self.write_error is None:
                    log.warning("LoRA-X: could not write the SVD cache in %s (%s); transfers work, but the "
                                "next run will decompose again. Set LORAX_SVD_CACHE to a writable folder, or "
                                "LORAX_SVD_CACHE=off.", self.folder, e)
                self.write_error = f"{type(e).__name__}: {e.strerror or e}"
                return
            self._evict()
        if origin:
            self.note_origin(digest, origin)

    def entries(self) -> list[tuple[str, int, float]]:
        """``(path, size, mtime)`` of every entry, oldest first."""
        out = []
        try:
            names = os.listdir(self.folder)
        except (FileNotFoundError, NotADirectoryError):
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

    def models(self) -> list[ModelUsage]:
        """Entries grouped by the model they were read from, largest first. An entry whose weight
        occurs in several models (layers a fine-tune left unchanged) is listed under each and counted
        in ``shared``; entries of no recorded model are listed under :data:`UNKNOWN_MODEL`."""
        origins = self.origins_of()
        usage: dict[str, ModelUsage] = {}
        for path, size, mtime in self.entries():
            digest = os.path.basename(path).split("-", 1)[0]
            models = origins.get(digest) or {UNKNOWN_MODEL}
            for model in models:
                u = usage.setdefault(model, ModelUsage(model))
                u.entries += 1
                u.bytes += size
                u.last_used = max(u.last_used, mtime)
                u.shared += len(models) > 1
                u.paths.append(path)
        return sorted(usage.values(), key=lambda u: -u.bytes)

    def clear(self, model: str | None = None) -> tuple[int, int, int]:
        """Remove every entry and index (``model`` None), or the entries of one model — except those
        another model shares, which it still needs. ``model`` is matched against the recorded
        models as given and as an absolute path. Returns ``(entries removed, bytes freed, kept
        because shared)``. Raises :class:`LoraxError` when nothing could be removed for lack of
        permission, naming the folder."""
        if model is None:
            targets = [(p, s) for p, s, _ in self.entries()]
            kept = 0
        else:
            names = {model, os.path.abspath(model)}
            origins = self.origins_of()
            targets, kept = [], 0
            for path, size, _ in self.entries():
                digest = os.path.basename(path).split("-", 1)[0]
                mine = origins.get(digest, set())
                if mine & names:
                    if mine - names:  # another model's too: kept, but no longer listed under this one
                        kept += 1
                        for origin in mine & names:
                            self._origins.put(f"{digest}|{origin}", "0")
                    else:
                        targets.append((path, size))
        removed = freed = 0
        denied: OSError | None = None
        for path, size in targets:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                denied = e
                continue
            removed += 1
            freed += size
        if model is None and denied is None:
            # Temporary files of writes a killed process never finished (atomic_save's ".lorax-*.part").
            for name in _listdir(self.folder):
                if name.startswith(".lorax-") and name.endswith(".part"):
                    self._remove(os.path.join(self.folder, name))
            for name in _LOGS:
                try:
                    os.unlink(os.path.join(self.folder, name))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    denied = e
            for log_ in (self._identities, self._scores, self._origins):
                log_.forget()
        if denied is not None:
            raise LoraxError(f"could not remove {len(targets) - removed} cache files ({denied.strerror or denied}); "
                             "check the folder's permissions, or remove it by hand", path=self.folder)
        return removed, freed, kept

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
        except (FileNotFoundError, PermissionError):
            pass


def _column_sq_norms(X: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """``(X * X).sum(0)`` a block of rows at a time, so the temporary stays small and cache-resident
    instead of a fresh m × k allocation per entry (measured: half the CPU time for a 10240 × 320 float16 entry)."""
    out = torch.zeros(X.shape[1], dtype=X.dtype)
    for start in range(0, X.shape[0], rows):
        block = X[start:start + rows]
        out += (block * block).sum(dim=0)
    return out


def _spot_columns(X: torch.Tensor, count: int = 8) -> torch.Tensor:
    """About ``count`` evenly spaced columns of ``X``, the first and the last among them, taken as
    strided slices: indexing a list of columns of a row-major ``m × k`` matrix gathers element by
    element and cost 4× as much (0.8 ms for a 10240 × 320 entry, ~20 % of reading it)."""
    k = X.shape[1]
    step = max(1, -(-(k - 1) // (count - 1)))
    return torch.cat([X[:, 0:k - 1:step], X[:, k - 1:]], dim=1)


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


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

    def items(self) -> list[tuple[str, str]]:
        return list(self._load().items())

    def forget(self) -> None:
        """Drop what was read (the file was removed)."""
        self._items = None

    def put(self, key: str, value: str) -> None:
        if any(c in key or c in value for c in "\t\n"):
            return
        items = self._load()
        if items.get(key) == value:
            return
        with self._lock:
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(f"{key}\t{value}\n")
            except OSError:
                return
            items[key] = value


def _are_numbers(text: str) -> bool:
    """Comma-separated finite numbers (a score line's value)."""
    try:
        return all(math.isfinite(float(v)) for v in text.split(","))
    except ValueError:
        return False


_OFF = ("off", "0", "none", "false", "no")


def cache_disabled() -> bool:
    """Whether the user turned the cache off (``LORAX_SVD_CACHE=off``)."""
    return os.environ.get("LORAX_SVD_CACHE", "").strip().lower() in _OFF


def cache_folder(default_folder: str | os.PathLike) -> str:
    """Where the cache lives: ``LORAX_SVD_CACHE`` when it names a folder, else ``default_folder``."""
    setting = os.environ.get("LORAX_SVD_CACHE", "").strip()
    return os.path.expanduser(setting) if setting and setting.lower() not in _OFF else os.fspath(default_folder)


def cache_from_env(default_folder: str | os.PathLike, *, ignore_off: bool = False) -> SVDCache | None:
    """The cache the user configured: ``LORAX_SVD_CACHE`` (a folder, or ``off``) and
    ``LORAX_SVD_CACHE_GB`` (size bound, default 16), else ``default_folder``. ``ignore_off``: the
    folder even when the cache is turned off (``python -m lorax cache`` still lists and clears it)."""
    if cache_disabled() and not ignore_off:
        return None
    raw = os.environ.get("LORAX_SVD_CACHE_GB", str(DEFAULT_MAX_BYTES >> 30))
    try:
        gigabytes = float(raw)
        if not math.isfinite(gigabytes) or gigabytes < 0:
            raise ValueError
    except ValueError:
        raise LoraxError(f"LORAX_SVD_CACHE_GB must be a non-negative number of gigabytes, got {raw!r}; "
                         "unset it for the default (16)") from None
    return SVDCache(cache_folder(default_folder), max_bytes=int(gigabytes * (1 << 30)))


def describe_bytes(n: int) -> str:
    """``3.17 GiB``, ``12.0 MiB``: binary units, the ones ``LORAX_SVD_CACHE_GB`` counts in (16 = 16 GiB)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} bytes"


def cache_summary(cache: SVDCache | None, hits: int = 0, written: int = 0, bytes_read: int | None = None) -> str:
    """What reports say about the cache: off, or where it is, how big against its limit, and what
    this run read from it (``hits`` entries, ``bytes_read``; default: all the cache object has read)
    and decomposed (``written`` layers), and why writing failed, when it did."""
    if cache is None:
        return ("off (LORAX_SVD_CACHE=off or --no-cache): every run decomposes every layer; "
                "`python -m lorax cache` lists what an earlier cache holds")
    line = (f"{describe_bytes(cache.size_bytes())} in {cache.folder} (limit {describe_bytes(cache.max_bytes)}); "
            f"this run read {hits} entries ({describe_bytes(cache.bytes_read if bytes_read is None else bytes_read)}) "
            f"and decomposed {written} layers")
    if cache.write_error:
        line += f"; could not write to it ({cache.write_error}): set LORAX_SVD_CACHE to a writable folder"
    return line + "; `python -m lorax cache` lists it by model"
