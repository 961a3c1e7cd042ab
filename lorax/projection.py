"""The projections that move a delta from a source layer into a target layer.

All three work on the factored form when the delta has one, so no ``m × n`` product is ever
formed for a LoRA: for ``ΔW = B·A`` the projection ``P ΔW Q`` is ``(P B)(A Q)``.

``lorax`` — the seed paper's transfer (LoRA-X, Farhadzadeh et al., ICLR 2025)::

    ΔW_{t←s} = U_t,k U_t,kᵀ ΔW_s V_t,k V_t,kᵀ      →  B′ = U_t(U_tᵀB),  A′ = (A V_t)V_tᵀ

  Exact, rank ≤ rank(ΔW_s). Keeps only the part of the delta that lies in the target's
  principal subspaces; a LoRA-X delta transferred back onto its own source is unchanged.

``prolora`` — ProLoRA (arXiv 2506.04244) also carries the null-space part::

    P∥_t (P∥_s ΔW Q∥_s) Q∥_t + P⊥_t (P⊥_s ΔW Q⊥_s) Q⊥_t,     P∥ = U_kU_kᵀ, P⊥ = I − P∥

  (Q on the V side). Rank ≤ 2·rank(ΔW_s). It drops the cross terms ``P∥ΔWQ⊥``. For a LoRA-X delta
  (inside the source's subspaces) it equals ``lorax``; for ordinary LoRAs ``bench/fidelity.py``
  measured it keeping more of the adapter's effect than ``lorax`` on fine-tunes (docs/fidelity.md).

``paired`` — the seed's dimension-mismatch rule for layers whose shapes differ. The paper writes
  ``Ũ_s = U_t U_sᵀ(U_sU_sᵀ)⁻¹U_s``; ``U_sU_sᵀ`` has rank k < m and is singular, and with the
  pseudo-inverse the rule reduces to pairing singular directions by index::

    ΔW_{t←s} = U_t,k (U_s,kᵀ ΔW_s V_s,k) V_t,kᵀ

  which is what is computed (nothing is inverted). The off-diagonal core entries depend on the
  signs of the singular vectors, hence the canonical signs of :mod:`lorax.svd`.
"""

from __future__ import annotations

import torch

from .delta import Delta
from .svd import SVDFactors

MODES: tuple[str, ...] = ("lorax", "prolora")


def _on(delta: Delta, basis: SVDFactors) -> Delta:
    return delta.to(device=basis.U.device, dtype=basis.U.dtype)


def _perp(X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``(I − UUᵀ) X`` without forming ``I − UUᵀ``."""
    return X - U @ (U.mT @ X)


def project_lorax(delta: Delta, target: SVDFactors) -> Delta:
    """``U_t U_tᵀ ΔW V_t V_tᵀ`` (shapes must match)."""
    d = _on(delta, target)
    U, V = target.U, target.V
    if d.is_factored:
        return Delta(d.shape, up=U @ (U.mT @ d.up), down=(d.down @ V) @ V.mT)
    core = U.mT @ d.dense @ V
    return Delta(d.shape, up=U @ core, down=V.mT.contiguous())


def project_prolora(delta: Delta, source: SVDFactors, target: SVDFactors) -> Delta:
    """ProLoRA's principal + null-space projection (shapes must match)."""
    d = _on(delta, target)
    source = source.to(device=target.U.device, dtype=target.U.dtype)
    Us, Vs, Ut, Vt = source.U, source.V, target.U, target.V
    if d.is_factored:
        return Delta(d.shape, up=_prolora_side(d.up, Us, Ut), down=_prolora_side(d.down.mT, Vs, Vt).mT)
    D = d.dense
    par = Ut @ ((Ut.mT @ Us) @ (Us.mT @ D @ Vs) @ (Vs.mT @ Vt)) @ Vt.mT
    perp = _perp(_perp(D, Us), Ut)
    perp = _perp(_perp(perp.mT, Vs), Vt).mT
    return Delta(d.shape, dense=par + perp)


def _prolora_side(X: torch.Tensor, Us: torch.Tensor, Ut: torch.Tensor) -> torch.Tensor:
    """``[P∥_t P∥_s X, P⊥_t P⊥_s X]`` (``m × 2r``) for a thin ``X``, one factor of the delta (``m × r``).

    Six ``m × k × r`` products where the two projections written out take eight, by sharing
    the inner products: with ``P = Us(UsᵀX)``, ``UtᵀP`` and ``UtᵀX`` give both parts, since
    ``Utᵀ(X − P) = UtᵀX − UtᵀP``. The warm SDXL benchmark spends most of its time here.
    """
    r = X.shape[1]
    P = Us @ (Us.mT @ X)
    inner = Ut.mT @ torch.cat([P, X], dim=1)  # k × 2r: [UtᵀP, UtᵀX]
    inner[:, r:] -= inner[:, :r]  # Utᵀ(X − P)
    out = Ut @ inner  # [Ut UtᵀP, Ut Utᵀ(X − P)]
    out[:, r:].neg_().add_(X).sub_(P)  # (X − P) − Ut Utᵀ(X − P)
    return out


def project_paired(delta: Delta, source: SVDFactors, target: SVDFactors, target_shape) -> Delta:
    """``U_t,k (U_s,kᵀ ΔW V_s,k) V_t,kᵀ`` for layers of different shapes (k = common rank)."""
    k = min(source.k, target.k)
    source = source.top(k).to(device=target.U.device, dtype=target.U.dtype)
    target = target.top(k)
    d = _on(delta, target)
    if d.is_factored:
        return Delta(tuple(target_shape), up=target.U @ (source.U.mT @ d.up), down=(d.down @ source.V) @ target.V.mT)
    core = source.U.mT @ d.dense @ source.V
    return Delta(tuple(target_shape), up=target.U @ core, down=target.V.mT.contiguous())
