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

``prolora_cross`` — ProLoRA with the cross terms it drops: each side's operator becomes
  ``T = P∥_t P∥_s + P⊥_t P⊥_s`` and the delta ``T_U ΔW T_Vᵀ``, which keeps all four blocks
  ``P∥ΔWQ∥, P∥ΔWQ⊥, P⊥ΔWQ∥, P⊥ΔWQ⊥`` (each carried by its side's operators). Rank ≤ rank(ΔW_s):
  the factored form is ``(T_U B)(A T_Vᵀ)``.

``transport`` — rotate the delta instead of projecting it: ``R_U ΔW R_Vᵀ`` with ``R_U`` the direct
  (minimal) rotation carrying the source's top-k left subspace onto the target's and the identity
  on everything orthogonal to both (Davis & Kahan's direct rotation; principal angles from the
  SVD ``U_sᵀU_t = Y cos Θ Zᵀ``), ``R_V`` the same on the right. Orthogonal, so the delta keeps its
  norm and rank; the identity when the subspaces did not move; applied to the factors in thin
  products (:func:`rotate_into`). A delta that lies in the source's subspaces lands in the
  target's, like ``lorax``; the part outside both is left where it is.

``copy`` — the delta as it is (what ComfyUI's stock loader applies), along the layer map.

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


def project_prolora_cross(delta: Delta, source: SVDFactors, target: SVDFactors) -> Delta:
    """``T_U ΔW T_Vᵀ`` with ``T = P∥_t P∥_s + P⊥_t P⊥_s`` per side (shapes must match)."""
    return _each_side(_cross_side, delta, source, target)


def _cross_side(X: torch.Tensor, Us: torch.Tensor, Ut: torch.Tensor) -> torch.Tensor:
    """``(P∥_t P∥_s + P⊥_t P⊥_s) X``: the two halves of :func:`_prolora_side` added."""
    r = X.shape[1]
    both = _prolora_side(X, Us, Ut)
    return both[:, :r] + both[:, r:]


def project_transport(delta: Delta, source: SVDFactors, target: SVDFactors) -> Delta:
    """``R_U ΔW R_Vᵀ``, the direct rotations of the source's subspaces onto the target's (shapes must match)."""
    return _each_side(rotate_into, delta, source, target)


def _each_side(side, delta: Delta, source: SVDFactors, target: SVDFactors) -> Delta:
    """``A ΔW Bᵀ`` for operators applied as ``side(X, U_s, U_t)`` (``A`` on the U side, ``B`` on the V side):
    on the factors of a factored delta (rank kept), else on the dense matrix from both sides."""
    d = _on(delta, target)
    source = source.to(device=target.U.device, dtype=target.U.dtype)
    if d.is_factored:
        return Delta(d.shape, up=side(d.up, source.U, target.U), down=side(d.down.mT, source.V, target.V).mT)
    D = side(d.dense, source.U, target.U)
    return Delta(d.shape, dense=side(D.mT, source.V, target.V).mT)


def rotate_into(X: torch.Tensor, Us: torch.Tensor, Ut: torch.Tensor) -> torch.Tensor:
    """``R X`` for the direct rotation ``R`` that carries ``span(Us)`` onto ``span(Ut)`` (``m × k`` each,
    orthonormal columns) and is the identity on the complement of ``span(Us) + span(Ut)``.

    With ``UsᵀUt = Y diag(c) Zᵀ`` (c = cosines of the principal angles), principal vectors
    ``P = UsY`` and ``W = UtZ − P diag(c)`` (``W ⊥ P``, ``‖w_i‖ = sin θ_i``), the rotation in each
    plane ``(p_i, w_i)`` is::

        R = I + P diag(c − 1) Pᵀ − W diag(1/(1 + c)) Wᵀ + W Pᵀ − P Wᵀ

    which, written through ``a = PᵀX`` and ``b = WᵀX``, is
    ``R X = X − Us Y (a + b/(1+c)) + Ut Z (a − b/(1+c))``: two ``m × k × r`` products each way
    and one ``m × k × k`` for ``UsᵀUt``. No division by ``sin θ``, so a plane that did not turn
    (``c = 1``) costs no precision. The ``k × k`` part runs in float64.
    """
    Y, c, Zh = torch.linalg.svd((Us.mT @ Ut).double())
    c = c.clamp(max=1.0)
    Z = Zh.mT
    a = Y.mT @ (Us.mT @ X).double()
    b = Z.mT @ (Ut.mT @ X).double() - c[:, None] * a
    b = b / (1.0 + c)[:, None]
    dtype = X.dtype
    return X - Us @ (Y @ (a + b)).to(dtype) + Ut @ (Z @ (a - b)).to(dtype)
