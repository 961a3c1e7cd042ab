"""Independent float64 references (numpy) and realistic random inputs for the core tests.

Nothing here calls the library: the references are written from the formulas in the paper
(dense matrices, explicit projectors), so an error in the library's factored arithmetic cannot
hide behind the same error in its reference.
"""

from __future__ import annotations

import numpy as np
import torch


def orthonormal(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((m, k)))
    return q * np.sign(np.diag(r))


def power_law_matrix(rng: np.random.Generator, m: int, n: int, exponent: float = 0.8,
                     scale: float = 1.0) -> np.ndarray:
    """An m×n matrix with singular values ∝ i^-exponent, like trained weights (not i.i.d. noise)."""
    r = min(m, n)
    s = scale * np.arange(1, r + 1, dtype=np.float64) ** -exponent
    return (orthonormal(rng, m, r) * s) @ orthonormal(rng, n, r).T


def perturbed(rng: np.random.Generator, w: np.ndarray, strength: float) -> np.ndarray:
    """A "fine-tune" of w: w plus a relative perturbation with its own power-law structure."""
    m = w.shape[0]
    p = power_law_matrix(rng, m, w.size // m, exponent=1.0).reshape(w.shape)
    return w + strength * np.linalg.norm(w) / np.linalg.norm(p) * p


def top_svd(w: np.ndarray, k: int):
    """Top-k of a full float64 SVD. LAPACK through torch (MKL): numpy's build here takes ~13 s for a
    1280 × 1280 matrix, MKL under 1 s; either is a plain full decomposition, not the library's."""
    U, S, Vt = torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)), full_matrices=False)
    return U[:, :k].numpy(), S[:k].numpy(), Vt[:k].T.numpy()


def phi_ref(Ua, Sa, Ub, Sb) -> float:
    A = Ua * np.sqrt(Sa)
    B = Ub * np.sqrt(Sb)
    return np.linalg.norm(A.T @ B) ** 2 / (np.linalg.norm(A.T @ A) * np.linalg.norm(B.T @ B))


def lorax_ref(delta, Ut, Vt):
    return Ut @ Ut.T @ delta @ Vt @ Vt.T


def lorax_ref_wide(delta, Ut, Vt):
    """:func:`lorax_ref` for layers too wide to form ``UtUtᵀ`` (3072 × 9216 in Flux): the same
    product of dense float64 matrices, associated so no m × m matrix is formed."""
    return Ut @ ((Ut.T @ delta) @ Vt) @ Vt.T


def prolora_ref(delta, Us, Vs, Ut, Vt):
    Ps, Pt = Us @ Us.T, Ut @ Ut.T
    Qs, Qt = Vs @ Vs.T, Vt @ Vt.T
    Im, In = np.eye(Ps.shape[0]), np.eye(Qs.shape[0])
    return Pt @ Ps @ delta @ Qs @ Qt + (Im - Pt) @ (Im - Ps) @ delta @ (In - Qs) @ (In - Qt)


def prolora_cross_ref(delta, Us, Vs, Ut, Vt):
    """ProLoRA with its cross terms: ``T_U ΔW T_Vᵀ``, ``T = P∥_t P∥_s + P⊥_t P⊥_s`` (explicit projectors)."""
    return _cross_operator(Us, Ut) @ delta @ _cross_operator(Vs, Vt).T


def _cross_operator(Us, Ut):
    Ps, Pt = Us @ Us.T, Ut @ Ut.T
    I = np.eye(Ps.shape[0])
    return Pt @ Ps + (I - Pt) @ (I - Ps)


def direct_rotation_ref(Us, Ut):
    """Davis & Kahan's direct rotation from span(Us) to span(Ut), from projectors only: the orthogonal
    polar factor of ``M = PtPs + (I − Pt)(I − Ps)`` (``MᵀM = I − (Pt − Ps)²``). No principal vectors, so
    it shares nothing with the library's factored formula; defined while no principal angle is 90°."""
    U, _, Vt = np.linalg.svd(_cross_operator(Us, Ut))
    return U @ Vt


def transport_ref(delta, Us, Vs, Ut, Vt):
    return direct_rotation_ref(Us, Ut) @ delta @ direct_rotation_ref(Vs, Vt).T


def paired_ref(delta, Us, Vs, Ut, Vt):
    return Ut @ (Us.T @ delta @ Vs) @ Vt.T


#: Relative error allowed on results of the fast SVD routes (projected deltas, projectors) against
#: float64 references since the engine rounds U and V to float16 (lorax/engine.py, SVD cache v2).
#: Each entry then carries up to 2⁻¹¹ ≈ 4.9e-4 relative rounding; measured on projected deltas
#: 1.7–4.3e-4 on SDXL shapes (bench/cache_precision.py) and up to 4.9e-4 on the tests' 48 × 40
#: slices, so 1.5e-3 is a 3× margin — and still below bfloat16's 2–3.4e-3, so a change of the
#: stored precision to bfloat16 fails the tests. (Before: float32 factors, 1e-6.)
HALF_FACTOR_TOL = 1.5e-3


def rel_err(a, b) -> float:
    a = a.detach().double().cpu().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().double().cpu().numpy() if isinstance(b, torch.Tensor) else b
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def t(x: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


def fresh_seed() -> int:
    """A new seed every run (inputs are fresh), or LORAX_TEST_SEED to replay a failure."""
    import os

    env = os.environ.get("LORAX_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")
