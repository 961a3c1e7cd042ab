"""Content fingerprints of weights: what caches are keyed by, and how a wrong source is caught.

Two kinds, for two jobs:

* :func:`weight_digest` — a BLAKE2b hash of the exact bytes (plus dtype and shape). Keys the SVD
  cache: a file name says nothing about the weights, and two files with the same name differ.
* :func:`weight_sketch` — two numbers per layer that survive a dtype change (fp32 → fp16/bf16
  re-saves are common): the Frobenius norm and a fixed random bilinear probe ``gᵀ W h``. A LoRA-X
  adapter stores them for its source so that applying it to the wrong base model is reported
  instead of silently producing garbage.
"""

from __future__ import annotations

import hashlib
import math

import torch

#: Relative tolerance when comparing sketches: fp16 rounding moves them by ~1e-3 at most.
SKETCH_RTOL = 2e-2


def weight_digest(weight: torch.Tensor) -> str:
    """Hex digest of the weight's bytes, dtype and shape."""
    t = weight.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _probe(n: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64).to(device) / math.sqrt(n)


def weight_sketch(weight: torch.Tensor) -> torch.Tensor:
    """``[‖W‖_F, gᵀ W h]`` in float64, with ``g``, ``h`` fixed by the shape."""
    w = weight.detach()
    w = (w.float() if w.element_size() == 1 else w).double().reshape(w.shape[0], -1)
    m, n = w.shape
    g = _probe(m, 1000003 * m + n, w.device)
    h = _probe(n, 7919 * n + m, w.device)
    return torch.stack([torch.linalg.matrix_norm(w), g @ w @ h]).cpu()


def sketches_match(stored: torch.Tensor, actual: torch.Tensor, rtol: float = SKETCH_RTOL) -> bool:
    """Whether two sketches describe the same weight up to dtype rounding."""
    stored, actual = stored.double(), actual.double()
    scale = max(float(stored[0]), float(actual[0]), 1e-30)
    return bool(((stored - actual).abs() <= rtol * scale).all())
