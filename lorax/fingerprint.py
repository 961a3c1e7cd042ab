"""Content fingerprints of weights: what caches are keyed by, and how a wrong source is caught.

Two kinds, for two jobs:

* :func:`weight_digest` — a BLAKE2b hash of the exact bytes (plus dtype and shape). Keys the SVD
  cache: a file name says nothing about the weights, and two files with the same name differ.
* :func:`weight_sketch` — a few numbers per layer that survive a dtype change (fp32 → fp16/bf16
  re-saves are common) but not a fine-tune: the Frobenius norm and eight fixed random bilinear
  probes ``gⱼᵀ W hⱼ`` (i.i.d. normal g, h, so each probe is ~N(0, ‖W‖²_F) across layers). A
  fine-tune that moves the weight by 1 % of its norm moves each probe by ~1 % of the norm;
  half-precision rounding moves it by ~0.05 % (fp16) to ~0.1 % (bf16). A LoRA-X adapter stores
  the sketches of its source so that applying it to the wrong base model is reported instead of
  silently producing garbage.
"""

from __future__ import annotations

import hashlib
import math
import weakref

import torch

from .devices import float64_device

#: Number of random probes in a sketch (plus the norm).
PROBES = 8
SKETCH_SIZE = PROBES + 1


def sketch_tolerance(dtype: torch.dtype) -> float:
    """Allowed sketch deviation, relative to ‖W‖_F, for a weight stored in ``dtype``.

    About five times the rounding a re-save in that dtype causes, so a copy passes and anything
    that moved the weight by ~1 % (fp32/fp16/bf16) fails; fp8 copies are accepted at the price of
    a coarse check.
    """
    if dtype.is_floating_point and torch.finfo(dtype).bits == 8:
        return 0.15
    if dtype == torch.bfloat16:
        return 8e-3
    return 5e-3


# id(tensor) → (weak reference, version counter, digest): a weight that is still the same live,
# unmodified tensor is not hashed again (ComfyUI keeps model parameters alive across runs).
_DIGEST_MEMO: dict[int, tuple[weakref.ref, int, str]] = {}


def _version(weight: torch.Tensor) -> int | None:
    try:
        return int(weight._version)
    except RuntimeError:  # inference tensors keep no version counter: never memoise those
        return None


def weight_digest(weight: torch.Tensor) -> str:
    """Hex digest of the weight's bytes, dtype and shape (memoised per live, unmodified tensor)."""
    key = id(weight)
    hit = _DIGEST_MEMO.get(key)
    version = _version(weight)
    if hit is not None and version is not None and hit[0]() is weight and hit[1] == version:
        return hit[2]
    t = weight.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))  # no copy of the bytes
    digest = h.hexdigest()
    if version is not None:
        try:
            ref = weakref.ref(weight, lambda _ref, key=key: _DIGEST_MEMO.pop(key, None))
        except TypeError:
            return digest
        _DIGEST_MEMO[key] = (ref, version, digest)
    return digest


def _probes(count: int, n: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, n, generator=gen, dtype=torch.float64).to(device)


def weight_sketch(weight: torch.Tensor) -> torch.Tensor:
    """``[‖W‖_F, g₁ᵀWh₁, …, g₈ᵀWh₈]`` in float64, the probes fixed by the shape."""
    w = weight.detach()
    w = w.to(float64_device(w.device))  # MPS and DirectML have no float64 (lorax.devices)
    w = (w.float() if w.element_size() == 1 else w).double().reshape(w.shape[0], -1)
    m, n = w.shape
    g = _probes(PROBES, m, 1000003 * m + n, w.device)
    h = _probes(PROBES, n, 7919 * n + m, w.device)
    values = ((g @ w) * h).sum(dim=1)
    return torch.cat([torch.linalg.matrix_norm(w).reshape(1), values]).cpu()


def sketches_match(stored: torch.Tensor, actual: torch.Tensor, rtol: float) -> bool:
    """Whether two sketches describe the same weight up to ``rtol``·‖W‖_F."""
    stored, actual = stored.double(), actual.double()
    if stored.shape != actual.shape:
        return False
    scale = max(float(stored[0]), float(actual[0]), 1e-30)
    return bool(((stored - actual).abs() <= rtol * scale).all())
