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

* ``subspace`` (chosen automatically for wide layers, see :func:`wide_route` and
  :class:`lorax.engine.SVDEngine`): block subspace iteration on the Gram matrix in float32, then a
  Rayleigh–Ritz step on the weight. Its cost grows with ``k`` where ``gram``'s grows with the width:
  ``gram`` pays a full ``s × s`` eigendecomposition (``O(s³)``, ``s`` the smaller side), this route
  ``q`` products of the ``s × s`` Gram matrix with ``2k`` columns and their QR (``O(q·s²·k)``, ``q``
  chosen as it goes, at most 12, 5–12 measured), the ``2k × 2k`` eigendecomposition of the
  projected Gram matrix, and one pass over the weight. Why these choices, measured on power-law spectra
  (σ_i ∝ i^-decay, stored in float16; k = 320 at 3072², 12288 × 3072 and 3840², one thread):

  - *Chebyshev-filtered steps*: after one product with a random block, every other multiplies by
    ``G − μ_j I`` with ``μ_j`` the nodes of a Chebyshev polynomial on ``[0, θ]`` (``θ`` the smallest
    Ritz value of the basis, a lower bound of ``λ_2k``, taken anew each round), a QR after every
    product. Plain powers shrink the error by ``λ_2k/λ_k`` a step; a round of ``m`` filtered steps
    by ``T_m(x)``, ``x = 2λ_k/λ_2k − 1`` (3× against 10× a step at decay 0.8). A polynomial
    applied without a QR between its factors loses the subspace in float32 (one product spreads
    the columns' scales by ``λ₁/λ_2k`` ≈ 3e4): the QRs are what make the filter usable.
  - *an adaptive schedule*: spectra differ in what they need — the fixed 8 products of the route
    before (2 plain, 6 filtered) gave 3.3e-5 relative error of the projected delta at decay 0.8,
    1.1e-4 at 0.5 and 2.4e-3 at 0.3 (12× over budget). Each round starts with the Ritz values of
    the basis; how far the top-k rose over the last round, ``d = Δθ/θ``, estimates the basis's error
    as ``3·√mean(d)/T_m(x)`` (Ritz values err by the square of their vectors' angles; the factor 3
    measured, 2.9–3.5), and the route stops once that is a quarter of the budget
    (:data:`SUBSPACE_TARGET_ERROR`), when it stops falling (the float32 floor below), or at
    :data:`SUBSPACE_MAX_PRODUCTS`. Measured: decay 0.8: 7 products, 3.2–3.7e-5 on the three shapes;
    0.5: 9, 1.8–1.9e-5; 0.3: 12, 4.0–4.4e-5; 1.2: 5 (the floor). The tests' small matrices, 25 seeds
    each: at most 1.8e-4 (tests/test_lorax_math.py).
  - *float32 throughout but one small eigendecomposition*: the iterations only have to find a
    ``2k``-wide subspace that contains the top-k one, and ``B = QᵀW`` and ``BBᵀ`` in float32 round
    at ~1e-7, far below that subspace's own error: against a float64 Rayleigh–Ritz step on the
    same basis, 3.379e-5 against 3.376e-5 (3072², decay 0.8), 3.61e-5 against 3.58e-5 (12288 × 3072),
    4.30e-5 against 4.27e-5 (decay 0.3), in 0.35 s instead of 0.6 s (3072²) and 1.05–1.09 s instead
    of 1.55–1.64 s (12288 × 3072), 7–9 % of a layer. Only the ``2k × 2k``
    eigendecomposition of ``BBᵀ`` is float64; it gives the rotation ``W_k``, ``U = QW_k``, and
    ``V = BᵀW_k`` in float32 with ``σ`` its column norms — relative to float32's precision whatever
    ``σ_i/σ₁``, where the eigenvalues of a float32 ``BBᵀ`` round at ``ε₃₂·σ₁²``. The factors are
    orthonormal to ~2.5e-7 (the engine keeps them in float16). A kept ``σ`` below ``√ε₃₂·σ₁``
    (:data:`_FLOAT32_RESOLVES`) is below what the float32 Gram matrix holds, so such a weight takes
    ``gram``. Steep spectra are limited by the float32 Gram matrix itself (decay 1.2: 2.5e-3
    whatever the steps, 0.4× that spectrum's float16 floor of 6.3e-3).
  - *the Gram matrix from its lower block triangle*: 10 of 16 tile products (0.63 of the work; 6
    or 8 tiles measured no faster, 12288 × 3072: 1.96 and 2.03 s against 1.96 s).
  - *oversampling k (a width of 2k)*: measured at 3072²: a width of 1.5k at 8 products erred 1.3e-4
    (decay 0.8) and 2.3e-3 (0.5) against 3.3e-5 and 1.1e-4 at 2k, and needed 10 products to match 2k's
    8 at decay 0.8 (2.78 s against 3.02 s) but not at 0.5 (4.0e-4); 1.25k at 10 products: 5.7e-4.
  - *not* LAPACK's subset eigensolver (``scipy.linalg.eigh(driver="evr", subset_by_index=…)``,
    exact): 1.4× at 3072², since the tridiagonal reduction is still ``O(s³)``; *not* block Krylov
    (2.3e-3 at the cost of 4 products of 320 columns); *not* LU normalisation between powers; *not*
    a float32 Rayleigh–Ritz that keeps only the top ``k + p`` Ritz vectors before the float64 step
    (1.0–1.6e-3 at p = 64–160); *not* Cholesky QR with a float64 Gram of the block (0.096 s against
    Householder's 0.121 s at 3072 × 640, 0.120 against 0.107 at 3840 × 640: nothing to gain); *not*
    warm-starting a fine-tune's basis from its source's (3.2e-1 off at the start on the benchmark's 5 %
    fine-tune, 4 filtered steps to 1.4e-4: a cold start's schedule, and a result that would depend
    on which source came first).

  The weight is read block by block as in the streamed Gram route, so the extra memory is the
  float32 Gram matrix (``4s²`` bytes), then the ``2k × l`` float32 projection and the ``l × k``
  float64 factor, not a float64 copy.

All methods batch several weights of one shape into one call (``subspace`` decomposes them one
after the other: its products are already large).

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

Method = Literal["exact", "gram", "randomized", "subspace"]
METHODS: tuple[str, ...] = ("exact", "gram", "randomized", "subspace")

#: Extra random directions beyond k for the randomized range finder (None: k itself).
DEFAULT_OVERSAMPLE = None
#: Power iterations for the randomized range finder (see the module docstring).
DEFAULT_POWER_ITERATIONS = 6
#: Above this fraction of ``min(m, n)`` the randomized method saves nothing.
_RANDOMIZED_MAX_FRACTION = 0.5
#: The most products with the Gram matrix the ``subspace`` route takes; it stops sooner when its
#: error estimate reaches :data:`SUBSPACE_TARGET_ERROR` (module docstring, :func:`_subspace_basis`).
SUBSPACE_MAX_PRODUCTS = 12
#: What the ``subspace`` route may add to a projected delta, relative, against the float64 SVD of
#: the same stored weight: below the float16 storage floor of the wide layers it serves
#: (7.2–9.8e-4 on Wan 2.2, Z-Image, Qwen-Image; 1.2–9.7e-3 on SD/SDXL shapes) and half of what the
#: engine's float16 factors add anyway (4.2e-4; the two add in quadrature: at most 4.7e-4).
#: Measured 2.8–3.7e-5 on the layers of all three families (bench/wide_families.py, decay 0.8) and
#: 1.8–4.4e-5 at decays 0.3–0.5 on 3072² to 3840²; the tests' small matrices up to 1.8e-4
#: (tests/test_lorax_math.py).
SUBSPACE_ERROR_BUDGET = 2e-4
#: What the ``subspace`` route's own error estimate must reach before it stops: a quarter of the
#: budget, since a round's predicted error ran up to 6× below the error then measured (rounds of up
#: to 3 steps, decay 0.8, 3072²).
SUBSPACE_TARGET_ERROR = SUBSPACE_ERROR_BUDGET / 4
#: The smaller side from which the engine takes the ``subspace`` route by default (wide_route):
#: every SD1.5/SDXL layer (at most 1280) keeps ``gram``; Flux (3072), Qwen-Image (3072),
#: Z-Image (3840) and Wan 2.2 (5120) take it. The crossover between 1280 and 3072 was not measured:
#: 2048 only keeps every SD layer on the route measured for it, and sends every measured wide one here.
WIDE_FROM = 2048
#: The ``subspace`` route saves nothing unless its width ``2k`` is at most this fraction of ``s``.
_SUBSPACE_MAX_FRACTION = 0.5
#: Elements of an fp8 weight upcast through float32 at a time (weight_matrix).
_FP8_BLOCK = 1 << 22
#: Bytes of one float64 block of a weight read at a time by the streamed routes (_gram_streamed, _subspace_streamed).
_STREAM_BLOCK_BYTES = 32 << 20
#: Chebyshev-filtered steps in the ``subspace`` route's first round, and the most in any later one
#: (_subspace_basis): a round's cut and error estimate come from the Ritz values before it, so short
#: rounds keep both fresh. Rounds of up to 3 saved a product at decay 0.8 but erred up to 2.3e-4 on
#: the tests' small matrices (25 seeds a shape), above the budget; rounds of up to 2: at most 1.8e-4.
_SUBSPACE_FIRST_STEPS = 2
_SUBSPACE_MAX_ROUND = 2
#: ``error ≈ 3·√mean(Δθ/θ)/T_m(x)`` (_subspace_basis): the factor measured between the estimate and
#: the projected-delta error after a round, 2.9–3.5 on 3072² at decays 0.3–0.8.
_ESTIMATE_FACTOR = 3.0
#: Row tiles of the ``subspace`` route's float32 Gram matrix; only the lower block triangle is multiplied.
_GRAM_TILES = 4
#: Smallest σ_k/σ₁ the subspace route keeps: √ε of float32. The float32 Gram matrix rounds at about
#: ε₃₂·σ₁², so directions with σ² below that are not in it; such a weight (rank-deficient, or a spectrum
#: falling faster than i^-1.4 at k = 320) takes the exact float64 Gram route instead.
_FLOAT32_RESOLVES = math.sqrt(torch.finfo(torch.float32).eps)


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


def wide_route(shape: Sequence[int], k: int, wide_from: int | None = WIDE_FROM) -> bool:
    """Whether a weight of this shape takes the ``subspace`` route at rank ``k`` when the engine
    chooses (method ``gram``): its smaller side is at least ``wide_from`` (None: never) and the
    route's width ``2k`` at most half of it, so the iterations cost less than the full
    eigendecomposition they replace."""
    if wide_from is None:
        return False
    s = max_rank(shape)
    return s >= wide_from and 2 * k <= _SUBSPACE_MAX_FRACTION * s


def route_key(method: str, max_products: int = SUBSPACE_MAX_PRODUCTS) -> str:
    """The name factors of ``method`` are cached and remembered under: the method, and for
    ``subspace`` its schedule (``c``: Chebyshev-filtered; ``q`` was plain powers) and product count,
    since another schedule or count gives other numbers — so changing
    route or settings never reads back factors another computation made."""
    return f"subspace-a{max_products}" if method == "subspace" else method


def truncated_svd(weight: torch.Tensor, k: int, *, method: Method = "exact",
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  oversample: int | None = DEFAULT_OVERSAMPLE, power_iterations: int | None = None,
                  seed: int = 0) -> SVDFactors:
    """Top-``k`` singular triplets of one weight. See :func:`truncated_svd_batch`."""
    return truncated_svd_batch([weight], k, method=method, dtype=dtype, device=device,
                               oversample=oversample, power_iterations=power_iterations, seed=seed)[0]


def truncated_svd_batch(weights: Sequence[torch.Tensor], k: int, *, method: Method = "exact",
                        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                        oversample: int | None = DEFAULT_OVERSAMPLE,
                        power_iterations: int | None = None, seed: int = 0) -> list[SVDFactors]:
    """Top-``k`` singular triplets of several weights of one shape, in one batched computation.

    ``dtype`` defaults to float64 for ``exact``/``gram`` and float32 for ``randomized``; results are
    returned in that dtype on ``device`` (default: the first weight's device), signs canonical.
    The randomized and subspace methods are deterministic for a given ``seed``; ``power_iterations``
    defaults to each one's own (:data:`DEFAULT_POWER_ITERATIONS`; for ``subspace`` the most products,
    :data:`SUBSPACE_MAX_PRODUCTS`).
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
    if method == "subspace":
        out = []
        for i, w in enumerate(weights):
            found = _subspace_streamed(w.to(device), k, SUBSPACE_MAX_PRODUCTS if power_iterations is None
                                       else power_iterations, seed)
            if found is None:  # nothing to save (2k close to s), or σ_k below float32's reach: the exact routes
                out += truncated_svd_batch([w], k, method="gram", dtype=dtype, device=device)
                continue
            U, S, V = (x.to(dtype) for x in found)
            U, V = canonical_signs(U, V)
            out.append(SVDFactors(U.contiguous(), S.contiguous(), V.contiguous()))
        return out
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
        U, S, V = _randomized(M, k, width, DEFAULT_POWER_ITERATIONS if power_iterations is None
                              else power_iterations, seed)
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
    tall, s, long, step, block = _long_side_blocks(weight)
    G = torch.zeros(s, s, dtype=torch.float64, device=weight.device)
    for start in range(0, long, step):
        B = block(start, torch.float64)
        G.addmm_(B, B.mT)
    top = _top_eigenpairs(G, k)
    del G
    if top is None:
        return None
    U, S = top
    V = torch.empty(long, k, dtype=torch.float64, device=weight.device)
    for start in range(0, long, step):
        V[start:start + step] = block(start, torch.float64).mT @ U / S
    return (V, S, U) if tall else (U, S, V)


def _long_side_blocks(weight: torch.Tensor):
    """How the streamed routes read a weight: as ``A``, the matrix oriented so its rows are the smaller
    side ``s`` (Gram ``WᵀW`` over blocks of rows of a tall weight, else ``WWᵀ`` over blocks of columns),
    ``step`` columns of its long side at a time, each block upcast on its own to the dtype asked for.
    Returns ``(tall, s, long, step, block)`` with ``block(start, dtype)`` an ``s × step`` matrix."""
    W = weight.reshape(weight.shape[0], -1)
    tall = W.shape[0] > W.shape[1]
    s, long = (W.shape[1], W.shape[0]) if tall else W.shape
    step = max(1, _STREAM_BLOCK_BYTES // (8 * s))

    def block(start: int, dtype: torch.dtype) -> torch.Tensor:
        return weight_matrix(W[start:start + step].mT if tall else W[:, start:start + step], dtype)

    return tall, s, long, step, block


def chebyshev_shifts(cut: float, steps: int) -> list[float]:
    """The shifts ``μ_j`` of a degree-``steps`` Chebyshev filter that damps ``[0, cut]``: the nodes of
    ``T_steps`` mapped onto that interval. ``Π_j (G − μ_j I)`` is, up to scale, the polynomial of that
    degree smallest on ``[0, cut]`` relative to its value above it (module docstring)."""
    return [cut / 2 * (1 + math.cos(math.pi * (2 * j + 1) / (2 * steps))) for j in range(steps)]


def _gram_float32(block, s: int, long: int, step: int, device) -> torch.Tensor:
    """``AAᵀ`` in float32, summed over blocks of ``A``'s long side, multiplying only the lower block
    triangle of :data:`_GRAM_TILES` row tiles (10 of 16 tile products: 0.63 of the work) and mirroring it."""
    G = torch.zeros(s, s, dtype=torch.float32, device=device)
    edges = [round(i * s / _GRAM_TILES) for i in range(_GRAM_TILES + 1)]
    for start in range(0, long, step):
        X = block(start, torch.float32)
        for a, b in zip(edges, edges[1:]):
            G[a:b, :b].addmm_(X[a:b], X[:b].mT)
        del X
    for a, b in zip(edges, edges[1:]):
        G[:a, a:b] = G[a:b, :a].mT
    return G


def chebyshev_gain(x: float, steps: int) -> float:
    """``T_steps(x)`` for ``x ≥ 1``: how much a degree-``steps`` filter that damps ``[0, cut]`` lifts an
    eigenvalue at ``λ = (x + 1)·cut/2`` over the damped interval (capped where a float overflows)."""
    return math.cosh(min(steps * math.acosh(max(x, 1.0)), 700.0))


def _subspace_basis(G: torch.Tensor, k: int, width: int, max_products: int, seed: int) -> tuple[torch.Tensor, int]:
    """An orthonormal ``s × width`` float32 basis that holds the top-``k`` eigenvectors of ``G`` to
    :data:`SUBSPACE_TARGET_ERROR`, and the products with ``G`` it took (at most ``max_products``).

    One product with a random block, then rounds of Chebyshev-filtered steps (a QR after each), every
    round damping ``[0, θ_w]`` with ``θ_w`` the smallest Ritz value of the basis so far (a lower bound
    of ``λ_width`` that sharpens as the basis converges). Each round starts with the Ritz values
    ``θ`` of the basis; how far the top-``k`` of them rose over the last round, ``d_i = Δθ_i/θ_i``,
    estimates the basis's error, ``3·√mean(d)/T_m(x)`` (``m`` that round's steps, ``x = 2θ_k/θ_w − 1``):
    Ritz values err by the square of their vectors' angles, and a round shrinks those by ``T_m(x)``.
    The next round takes the fewest steps (1 or 2) predicted to bring the estimate to the target and
    the route stops after it; where 2 are not enough it takes 2 and looks again. It stops at once
    when the estimate is there already (the product that started the round then serves as one more
    filtered step), when the estimate stopped falling to half (the float32 floor of steep spectra),
    or at ``max_products``. A QR after every product, shifted or not: one
    product spreads the columns' scales by ``λ₁/λ_width`` (≈ 3e4 at k = 320), two would exceed float32.
    """
    s = G.shape[0]
    gen = torch.Generator(device=G.device).manual_seed(seed)
    Q = torch.linalg.qr(G @ torch.randn(s, width, generator=gen, device=G.device, dtype=torch.float32)).Q
    products, previous, estimate, last_round = 1, None, math.inf, False
    steps = min(_SUBSPACE_FIRST_STEPS, max_products - 1)
    while products < max_products and not last_round:
        Y = G @ Q
        products += 1
        theta = torch.linalg.eigvalsh(Q.mT @ Y).flip(0).double()  # descending
        cut = max(0.0, float(theta[-1]))
        x = 2 * float(theta[k - 1]) / cut - 1 if cut > 0 else math.inf
        if previous is not None:
            rise = ((theta[:k] - previous[:k]) / theta[:k].clamp_min(1e-30 * float(theta[0]))).clamp_min(0)
            last = estimate
            estimate = _ESTIMATE_FACTOR * float(rise.mean().sqrt()) / chebyshev_gain(x, steps)
            if estimate <= SUBSPACE_TARGET_ERROR or estimate > last / 2 or products >= max_products:
                steps = 1  # the product already made: one more filtered step, and done
                last_round = True
            else:
                def reaches(m: int) -> bool:
                    return estimate / chebyshev_gain(x, m) <= SUBSPACE_TARGET_ERROR

                steps = next((m for m in range(1, _SUBSPACE_MAX_ROUND + 1) if reaches(m)), _SUBSPACE_MAX_ROUND)
                steps = min(steps, max_products - products + 1)
                last_round = reaches(steps)
        for j, mu in enumerate(chebyshev_shifts(cut, steps)):
            if j:
                Y = G @ Q
                products += 1
            Q = torch.linalg.qr(Y.sub_(Q, alpha=mu)).Q
        previous = theta
    return Q, products


def subspace_working_bytes(shape: Sequence[int], k: int) -> int:
    """Bytes :func:`_subspace_streamed` holds beyond the stored weight: the larger of its two phases —
    the float32 Gram matrix with the basis and its QR work (four ``s × 2k`` float32 arrays), or the
    float32 ``2k × l`` projection with the float64 ``l × k`` factor and the float32 basis — plus one
    block of the weight in flight. For Z-Image's 11520 × 3840 ``qkv`` at k = 320: 132 MB (a float64
    copy: 354 MB)."""
    s = max_rank(shape)
    long, width = math.prod(shape) // s, 2 * k
    iterating = 4 * s * s + 16 * s * width
    projecting = 4 * width * long + 8 * long * k + 4 * s * width
    return max(iterating, projecting) + _STREAM_BLOCK_BYTES


def _subspace_streamed(weight: torch.Tensor, k: int, max_products: int, seed: int):
    """The ``subspace`` route (module docstring) on one weight, read a block of the long side at a
    time: ``(U, S, V)`` in float64, or None where it does not apply (a width ``2k`` above half the
    smaller side) or a kept singular value is below what float32 resolves (the caller takes
    ``gram``, which falls back to the exact SVD where one is numerically zero).

    1. ``G = AAᵀ`` in float32 over blocks (``A`` the weight oriented so its rows are the smaller
       side ``s``; lower block triangle only): fp16/bf16/fp8 entries are exact in float32, only the sums round.
    2. A ``2k``-column basis ``Q`` from at most ``max_products`` products with ``G``, as many as its
       error estimate asks (:func:`_subspace_basis`).
    3. Rayleigh–Ritz in float32 but for one small step: ``B = QᵀA`` and ``C = BBᵀ`` over blocks,
       the top-k eigenvectors ``W`` of ``C`` in float64, then ``V = BᵀW`` with ``σ`` its column
       norms, ``U = QW``. None (the caller takes ``gram``) where a kept ``σ`` is below
       :data:`_FLOAT32_RESOLVES` of the largest.
    """
    tall, s, long, step, block = _long_side_blocks(weight)
    width = 2 * k
    if width > _SUBSPACE_MAX_FRACTION * s:
        return None
    G = _gram_float32(block, s, long, step, weight.device)
    Q, _ = _subspace_basis(G, k, width, max_products, seed)
    del G
    B = torch.empty(width, long, dtype=torch.float32, device=weight.device)
    C = torch.zeros(width, width, dtype=torch.float32, device=weight.device)
    for start in range(0, long, step):
        Bb = Q.mT @ block(start, torch.float32)
        B[:, start:start + step] = Bb
        C.addmm_(Bb, Bb.mT)
    top = _top_eigenpairs(C.double(), k)  # its σ (from float32 eigenvalues) are not kept: see below
    del C
    if top is None:
        return None
    Wk = top[0].float()
    V = torch.empty(long, k, dtype=torch.float64, device=weight.device)
    for start in range(0, long, step):
        V[start:start + step] = B[:, start:start + step].mT @ Wk
    del B
    S = V.norm(dim=0)  # ‖Aᵀu_i‖ = σ_i, to float32's relative precision whatever σ_i/σ₁
    if bool(S.min() <= S.max() * _FLOAT32_RESOLVES):
        return None
    V.div_(S)
    if bool((S[1:] > S[:-1]).any()):  # the eigenvalues' order, but ties within rounding may swap
        order = torch.argsort(S, descending=True)
        V, S, Wk = V[:, order], S[order], Wk[:, order]
    U = (Q @ Wk).double()
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
