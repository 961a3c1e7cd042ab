"""Subspace similarity Φ of a source and a target layer (LoRA-X, Eq. for Φ), with its chance level.

The seed paper's measure, with ``A = U_s,k diag(√σ_s,k)`` and ``B = U_t,k diag(√σ_t,k)``::

    Φ(A, B) = ‖AᵀB‖²_F / (‖AᵀA‖_F ‖BᵀB‖_F)
            = Σ_ij σ_s,i σ_t,j ⟨u_s,i, u_t,j⟩² / (‖σ_s‖ ‖σ_t‖)

(``AᵀA = diag(σ_s)`` because U has orthonormal columns). ``phi_right`` is the same on V.

Φ lies in [0, 1], is symmetric and is 1 for identical layers — but it is *not* 0 for unrelated
ones. For subspaces in random position ``E⟨u, v⟩² = 1/m``, so the expectation is::

    chance = (Σσ_s)(Σσ_t) / (m ‖σ_s‖ ‖σ_t‖)            ≤ k/m

which is about 0.5 for k = 320 in a 640-wide layer and exactly 1 at k = m, where the
projection is the identity and Φ says nothing. A raw threshold would therefore mean something
different for every layer width; LoRA-X thresholds the normalised score
``Φ̂ = (Φ − chance) / (1 − chance)`` (0 = no better than chance, 1 = identical subspaces) on both
the left and the right side by default. When ``chance = 1`` Φ̂ is defined as 1: the full-rank
projection is a plain copy, which is what the transfer then does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .svd import SVDFactors


def phi(U_s: torch.Tensor, S_s: torch.Tensor, U_t: torch.Tensor, S_t: torch.Tensor) -> float:
    """Φ between two bases of one side (U or V) weighted by their singular values."""
    if U_s.shape[0] != U_t.shape[0]:
        raise ValueError(f"Φ needs bases of one dimension, got {U_s.shape[0]} and {U_t.shape[0]}")
    dtype = torch.promote_types(U_s.dtype, U_t.dtype)
    U_t = U_t.to(device=U_s.device, dtype=dtype)
    S_s = S_s.to(device=U_s.device, dtype=dtype)
    S_t = S_t.to(device=U_s.device, dtype=dtype)
    overlap = (U_s.to(dtype).mT @ U_t) ** 2  # k_s × k_t
    num = S_s @ overlap @ S_t
    den = torch.linalg.vector_norm(S_s) * torch.linalg.vector_norm(S_t)
    if float(den) == 0.0:
        return 0.0
    return float((num / den).clamp(0.0, 1.0))


def chance_phi(S_s: torch.Tensor, S_t: torch.Tensor, dim: int) -> float:
    """Expected Φ of two subspaces of a ``dim``-wide space in random position, given their spectra."""
    S_s = S_s.double()
    S_t = S_t.double().to(S_s.device)
    den = float(torch.linalg.vector_norm(S_s) * torch.linalg.vector_norm(S_t)) * dim
    if den == 0.0:
        return 0.0
    return min(1.0, float(S_s.sum() * S_t.sum()) / den)


def normalized_phi(value: float, chance: float) -> float:
    """``Φ̂ = (Φ − chance)/(1 − chance)``; 1 when chance is 1 (see the module docstring)."""
    if chance >= 1.0 - 1e-12:
        return 1.0
    return (value - chance) / (1.0 - chance)


@dataclass(frozen=True)
class LayerSimilarity:
    """Φ and its normalisation on both sides of one layer pair at rank ``k``."""

    phi: float
    phi_right: float
    chance: float
    chance_right: float
    phi_hat: float
    phi_hat_right: float
    k: int

    @property
    def phi_hat_min(self) -> float:
        """The score the threshold is applied to: the weaker side."""
        return min(self.phi_hat, self.phi_hat_right)

    def as_dict(self) -> dict:
        return asdict(self)

    def scores(self) -> tuple[float, float, float, float]:
        """What determines the rest: ``(phi, phi_right, chance, chance_right)`` (see :meth:`from_scores`)."""
        return (self.phi, self.phi_right, self.chance, self.chance_right)

    @classmethod
    def from_scores(cls, phi: float, phi_right: float, chance: float, chance_right: float, k: int) -> "LayerSimilarity":
        """The similarity :meth:`scores` gave (the Φ̂ are derived exactly as when it was computed)."""
        return cls(phi=phi, phi_right=phi_right, chance=chance, chance_right=chance_right,
                   phi_hat=normalized_phi(phi, chance), phi_hat_right=normalized_phi(phi_right, chance_right), k=k)


@torch.no_grad()
def layer_similarity(source: SVDFactors, target: SVDFactors, k: int | None = None) -> LayerSimilarity:
    """Φ, Φ_right, chance levels and Φ̂ for two decompositions of equally shaped layers."""
    if source.shape != target.shape:
        raise ValueError(f"similarity needs layers of one shape, got {source.shape} and {target.shape}")
    k = min(source.k, target.k) if k is None else k
    s, t = source.top(k), target.top(k)
    m, n = source.shape
    left = phi(s.U, s.S, t.U, t.S)
    right = phi(s.V, s.S, t.V, t.S)
    return LayerSimilarity.from_scores(left, right, chance_phi(s.S, t.S, m), chance_phi(s.S, t.S, n), k=k)


@torch.no_grad()
def shared_sides(source: SVDFactors, target: SVDFactors, k: int) -> tuple[float | None, float | None]:
    """Φ̂ ``(left, right)`` at rank ``k`` of two layers of *different* shapes, on each side whose
    dimension they share, None on a side they do not: what the ``paired`` shape rule can score.
    Subspaces of a 3072- and a 6144-dimensional space have no overlap to measure, so layers that
    differ on both sides (Flux.1 → Flux.2) get no score at all."""
    s, t = source.top(k), target.top(k)
    (ms, ns), (mt, nt) = source.shape, target.shape
    left = normalized_phi(phi(s.U, s.S, t.U, t.S), chance_phi(s.S, t.S, ms)) if ms == mt else None
    right = normalized_phi(phi(s.V, s.S, t.V, t.S), chance_phi(s.S, t.S, ns)) if ns == nt else None
    return left, right
