"""Truncated singular value decompositions of weights, exact or randomized.

Every LoRA-X operation reads a layer through its top-k singular triplets. A weight is viewed as
a matrix ``out × (in·kh·kw)`` (conv kernels flattened the way LoRA down-projections are), upcast
from its stored dtype (fp16, bf16, fp8) before any arithmetic, and decomposed on whatever device
it is asked to run on.

Three methods:

* ``exact``: ``torch.linalg.svd`` in float64 — the reference, and what ``--exact`` selects.
* ``gram`` (default fast path): eigen-decomposition of the small Gram matrix ``MMᵀ`` (or
  ``MᵀM``) in float64, then the other side's vectors as ``MᵀU/σ``. Costs ``m²n + m³`` for
  ``m ≤ n`` instead of a full SVD; a whole SD1.5/SDXL-shaped transfer measured 2.8–3.0× faster
  than with float32 ``torch.linalg.svd`` on this project's 2-core CPU (docs/performance.md),
  at ~1e-13 error of the projected deltas in float64 (7e-7 once the factors are kept in
  float32): squaring the spectrum only hurts singular values below ~1e-8·σ₁, far below any
  top-k we use. The eigendecomposition dominates (0.26 s for 1280² single-threaded; float32
  would halve that at the cost of accuracy in the tail of the kept spectrum — not done).
* ``randomized``: a range finder with power iterations (Halko, Martinsson, Tropp 2011) in float32,
  for devices where float64 is slow (consumer GPUs) and very wide layers. Real weights have
  slowly decaying power-law spectra, so the default oversampling is ``k`` itself (a width of
  ``2k``) with 6 power iterations: with 16 extra directions the projected deltas were off by
  3–20 % on such spectra, with ``k`` extra and 4 iterations by 0.3–1.4 %. When ``2k`` gets close to ``min(m, n)``
  nothing is saved and ``gram`` (in float64) is used instead.

All methods batch several weights of one shape into one call.

Singular vectors are defined up to sign; :func:`canonical_signs` makes the largest-magnitude entry
of each left vector positive so that results, caches and the index-paired shape-mismatch rule
are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .errors import LoraxError

Method = Literal["exact", "gram", "randomized"]
METHODS: tuple[str, ...] = ("exact", "gram", "randomized")

#: Extra random directions beyond k for the randomized range finder (None: k itself).
DEFAULT_OVERSAMPLE = None
#: Power iterations for the randomized range finder (see the module docstring).
DEFAULT_POWER_ITERATIONS = 6
#: Above this fraction of ``min(m, n)`` the randomized method saves nothing.
_RANDOMIZED_MAX_FRACTION = 0.5
#: Elements of an fp8 weight upcast through float32 at a time (weight_matrix).
_FP8_BLOCK = 1 << 22
#: Bytes of one float64 block of a weight in the streamed Gram route (_gram_streamed).
_STREAM_BLOCK_BYTES = 32 << 20


@dataclass(frozen=True)
class SVDFactors:
    """Top-k singular triplets of a weight viewed as a matrix: ``W ≈ U diag(S) Vᵀ``.

    ``U`` is ``m × k``, ``S`` is ``k`` (descending), ``V`` is ``n × k``; columns orthonormal.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.S.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[0])

    def top(self, k: int) -> "SVDFactors":
        """The leading ``k`` triplets (a view; no copy)."""
        if k > self.k:
            raise ValueError(f"asked for {k} singular triplets, only {self.k} were computed")
        return SVDFactors(self.U[:, :k], self.S[:k], self.V[:, :k])

    def to(self, device=None, dtype=None, copy: bool = False) -> "SVDFactors":
        return SVDFactors(*(x.to(device=device, dtype=dtype, copy=copy) for x in (self.U, self.S, self.V)))


def weight_matrix(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight`` as an ``out × (in·kh·kw)`` matrix in ``dtype`` (upcasting fp16/bf16/fp8 first)."""
    _check_matrix(tuple(weight.shape))
    if weight.dtype != dtype:
        if weight.element_size() == 1 and dtype != torch.float32:
            # fp8 types cannot be converted to float64 directly on every build: go through float32,
            # a block of rows at a time, so no float32 copy of the whole layer exists besides the
            # result (0.26 GB saved at the peak for Flux's 21504 × 3072 linear1).
            out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
            step = max(1, _FP8_BLOCK // max(1, weight[0].numel()))
            for start in range(0, weight.shape[0], step):
                out[start:start + step] = weight[start:start + step].to(torch.float32)
            weight = out
        else:
            weight = weight.to(torch.float32) if weight.element_size() == 1 else weight
            weight = weight.to(dtype)
    return weight.reshape(weight.shape[0], -1)


def _check_matrix(shape: tuple[int, ...]) -> None:
    if len(shape) < 2:
        raise ValueError(f"a {len(shape)}-D tensor of shape {shape} has no singular subspace; only Linear and "
                         "Conv weights can be adapted")


def canonical_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-magnitude entry of the left vector is positive.

    Works on single (``m × k``) and batched (``b × m × k``) factors.
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(U, -2, idx))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, V * signs


def max_rank(shape: Sequence[int]) -> int:
    """The largest possible rank of a weight of this shape."""
    out = int(shape[0])
    inner = 1
    for d in shape[1:]:
        inner *= int(d)
    return min(out, inner)


def check_rank(k: int, shape: Sequence[int], *, key: str | None = None, path=None) -> None:
    if not isinstance(k, int) or k < 1:
        raise LoraxError(f"rank must be a positive integer, got {k!r}", key=key, path=path)
    full = max_rank(shape)
    if k > full:
        raise LoraxError(f"rank {k} is larger than the layer allows: a weight of shape {tuple(shape)} "
                         f"has rank at most {full}; choose a rank of at most {full}", key=key, path=path)


def truncated_svd(weight: torch.Tensor, k: int, *, method: Method = "exact",
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  oversample: int | None = DEFAULT_OVERSAMPLE, power_iterations: int = DEFAULT_POWER_ITERATIONS,
                  seed: int = 0) -> SVDFactors:
    """Top-``k`` singular triplets of one weight. See :func:`truncated_svd_batch`."""
    return truncated_svd_batch([weight], k, method=method, dtype=dtype, device=device,
                               oversample=oversample, power_iterations=power_iterations, seed=seed)[0]


def truncated_svd_batch(weights: Sequence[torch.Tensor], k: int, *, method: Method = "exact",
                        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                        oversample: int | None = DEFAULT_OVERSAMPLE,
                        power_iterations: int = DEFAULT_POWER_ITERATIONS, seed: int = 0) -> list[SVDFactors]:
    """Top-``k`` singular triplets of several weights of one shape, in one batched computation.

    ``dtype`` defaults to float64 for ``exact``/``gram`` and float32 for ``randomized``; results are
    returned in that dtype on ``device`` (default: the first weight's device), signs canonical.
    The randomized method is deterministic for a given ``seed``.
    """
    if method not in METHODS:
        raise LoraxError(f"unknown SVD method {method!r}; expected one of {', '.join(METHODS)}")
    if not weights:
        return []
    shape = tuple(weights[0].shape)
    for w in weights:
        if tuple(w.shape) != shape:
            raise ValueError(f"truncated_svd_batch needs weights of one shape, got {shape} and {tuple(w.shape)}")
    _check_matrix(shape)
    check_rank(k, shape)
    if dtype is None:
        dtype = torch.float32 if method == "randomized" else torch.float64
    device = torch.device(device) if device is not None else weights[0].device
    m, n = shape[0], math.prod(shape[1:])
    width = min(k + (k if oversample is None else oversample), min(m, n))
    randomized = method == "randomized" and width <= _RANDOMIZED_MAX_FRACTION * min(m, n)
    if method != "exact" and not randomized and len(weights) == 1:
        # The CPU engine's case: one weight at a time, never upcast whole (see _gram_streamed).
        streamed = _gram_streamed(weights[0].to(device), k)
        if streamed is not None:
            U, S, V = (x.to(dtype) for x in streamed)
            U, V = canonical_signs(U, V)
            return [SVDFactors(U.contiguous(), S.contiguous(), V.contiguous())]
    # One weight needs no stacked copy: a view with a batch axis will do.
    M = (weight_matrix(weights[0].to(device), dtype).unsqueeze(0) if len(weights) == 1
         else torch.stack([weight_matrix(w.to(device), dtype) for w in weights]))
    if randomized:
        U, S, V = _randomized(M, k, width, power_iterations, seed)
    elif method in ("gram", "randomized"):
        # The Gram route squares the spectrum: always in float64 (float32 loses the directions
        # near the cut, ~1e-1 error measured), whatever the requested output dtype.
        U, S, V = (x.to(M.dtype) for x in _gram(M.double(), k))
    else:
        U, S, V = _exact(M, k)
    U, V = canonical_signs(U, V)
    return [SVDFactors(U[i].contiguous(), S[i].contiguous(), V[i].contiguous()) for i in range(M.shape[0])]


def _exact(M: torch.Tensor, k: int):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[..., :k], S[..., :k], Vh[..., :k, :].mT


def _gram(M: torch.Tensor, k: int):
    """Top-k triplets from the eigen-decomposition of the smaller Gram matrix (batched).

    Falls back to the exact SVD when a kept singular value is numerically zero (a rank-deficient
    weight, e.g. a zero-initialised layer), where ``MᵀU/σ`` is undefined.
    """
    transpose = M.shape[-2] > M.shape[-1]
    A = M.mT if transpose else M          # b × s × l with s ≤ l
    top = _top_eigenpairs(A @ A.mT, k)
    if top is None:
        return _exact(M, k)
    U, S = top
    V = (A.mT @ U) / S.unsqueeze(-2)
    return (V, S, U) if transpose else (U, S, V)


def _top_eigenpairs(G: torch.Tensor, k: int):
    """``(U, S)`` of a (batched) Gram matrix ``G = AAᵀ``: its top-k eigenvectors and the singular
    values ``√λ`` of ``A``, largest first; None when a kept one is numerically zero (relative to the
    largest, 1e-7), where the other side's vectors ``AᵀU/σ`` would be undefined."""
    evals, evecs = torch.linalg.eigh(G)
    U = evecs[..., -k:].flip(-1)
    S = evals[..., -k:].flip(-1).clamp_min(0).sqrt()
    if bool((S[..., -1] <= S[..., 0] * 1e-7).any()):
        return None
    return U, S


def _gram_streamed(weight: torch.Tensor, k: int):
    """:func:`_gram` of one weight without a float64 copy of it: the Gram matrix is summed over
    blocks of the long side, each block upcast on its own, and the other side's vectors are
    computed block by block in a second pass. Peak extra memory is the ``s × s`` Gram matrix,
    one block (``_STREAM_BLOCK_BYTES``) and the factors — for Flux's 21504 × 3072 ``linear1``
    0.2 GB instead of the 0.5 GB float64 copy alone. ``(U, S, V)`` in float64, or None for a
    rank-deficient weight (the caller then takes the exact route).
    """
    W = weight.reshape(weight.shape[0], -1)
    tall = W.shape[0] > W.shape[1]        # Gram WᵀW over blocks of rows, else WWᵀ over blocks of columns
    s, long = (W.shape[1], W.shape[0]) if tall else W.shape
    step = max(1, _STREAM_BLOCK_BYTES // (8 * s))

    def block(start: int) -> torch.Tensor:  # s × b, float64
        return weight_matrix(W[start:start + step].mT if tall else W[:, start:start + step], torch.float64)

    G = torch.zeros(s, s, dtype=torch.float64, device=W.device)
    for start in range(0, long, step):
        B = block(start)
        G.addmm_(B, B.mT)
    top = _top_eigenpairs(G, k)
    del G
    if top is None:
        return None
    U, S = top
    V = torch.empty(long, k, dtype=torch.float64, device=W.device)
    for start in range(0, long, step):
        V[start:start + step] = block(start).mT @ U / S
    return (V, S, U) if tall else (U, S, V)


def _randomized(M: torch.Tensor, k: int, width: int, power_iterations: int, seed: int):
    """Batched randomized SVD of ``M`` (``b × m × n``) with re-orthonormalised power iterations."""
    gen = torch.Generator(device=M.device).manual_seed(seed)
    b, m, n = M.shape
    transpose = m < n  # iterate on the tall side: the QR factorizations are then the cheap ones
    A = M.mT if transpose else M
    omega = torch.randn(b, A.shape[-1], width, generator=gen, device=M.device, dtype=M.dtype)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(power_iterations):
        Z = torch.linalg.qr(A.mT @ Q).Q
        Q = torch.linalg.qr(A @ Z).Q
    small = Q.mT @ A  # b × width × n_A
    Ub, S, Vh = torch.linalg.svd(small, full_matrices=False)
    U = Q @ Ub[..., :k]
    S = S[..., :k]
    V = Vh[..., :k, :].mT
    if transpose:
        U, V = V, U
    return U, S, V
