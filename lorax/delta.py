"""The one representation of a weight change the library works on.

A :class:`Delta` is the change an adapter makes to one weight, scale already folded in
(alpha/rank, rsLoRA, strength…): either factored ``up @ down`` (``m × r`` times ``r × n``, the
weight viewed as ``m × n`` with conv kernels flattened) or dense ``m × n`` for adapters that have
no low-rank form (LoHa and LoKr products, DoRA after materialisation, ``diff`` patches). Parsing
file layouts is not done here: the ComfyUI bridge turns the host's weight-adapter objects into
Deltas, and the LoRA-X adapter builds them from the source's singular basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Delta:
    """``ΔW`` for a weight of ``shape``; factored (``up``, ``down``) or ``dense``, never both."""

    shape: tuple[int, ...]
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        m, n = self.matrix_shape
        if self.dense is not None:
            if self.up is not None or self.down is not None:
                raise ValueError("a Delta is either factored or dense, not both")
            if tuple(self.dense.shape) != (m, n):
                object.__setattr__(self, "dense", self.dense.reshape(m, n))
        else:
            if self.up is None or self.down is None:
                raise ValueError("a factored Delta needs both up and down")
            if self.up.dim() != 2 or self.down.dim() != 2 or self.up.shape[0] != m \
                    or self.down.shape[1] != n or self.up.shape[1] != self.down.shape[0]:
                raise ValueError(f"factors {tuple(self.up.shape)} @ {tuple(self.down.shape)} do not "
                                 f"make a {m}×{n} delta for a weight of shape {self.shape}")

    @staticmethod
    def factored(shape, up: torch.Tensor, down: torch.Tensor) -> "Delta":
        up = up.reshape(up.shape[0], -1)
        down = down.reshape(down.shape[0], -1)
        return Delta(tuple(shape), up=up, down=down)

    @staticmethod
    def from_dense(dense: torch.Tensor, shape=None) -> "Delta":
        shape = tuple(dense.shape) if shape is None else tuple(shape)
        return Delta(shape, dense=dense.reshape(shape[0], -1))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return self.shape[0], n

    @property
    def is_factored(self) -> bool:
        return self.dense is None

    @property
    def rank(self) -> int:
        """Rank bound: the inner dimension of the factors, or ``min(m, n)`` for a dense delta."""
        return int(self.up.shape[1]) if self.is_factored else min(self.matrix_shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.up.dtype if self.is_factored else self.dense.dtype

    @property
    def device(self) -> torch.device:
        return self.up.device if self.is_factored else self.dense.device

    def to(self, device=None, dtype=None) -> "Delta":
        if self.is_factored:
            return Delta(self.shape, up=self.up.to(device=device, dtype=dtype),
                         down=self.down.to(device=device, dtype=dtype))
        return Delta(self.shape, dense=self.dense.to(device=device, dtype=dtype))

    def matrix(self) -> torch.Tensor:
        """The dense ``m × n`` matrix (materialises a factored delta)."""
        return self.up @ self.down if self.is_factored else self.dense

    def weight(self) -> torch.Tensor:
        """The dense delta in the weight's own shape."""
        return self.matrix().reshape(self.shape)

    def norm(self) -> float:
        """Frobenius norm, via the ``r × r`` Gram matrices for a factored delta."""
        if self.is_factored:
            gram = (self.up.mT @ self.up) * (self.down @ self.down.mT)
            return float(gram.sum().clamp_min(0).sqrt())
        return float(torch.linalg.matrix_norm(self.dense))

    def inner(self, other: "Delta") -> float:
        """Frobenius inner product ``⟨self, other⟩``; for two factored deltas through ``r × r'`` products."""
        if self.is_factored and other.is_factored:
            other = other.to(device=self.up.device, dtype=self.up.dtype)
            return float(((self.up.mT @ other.up) * (self.down @ other.down.mT)).sum())
        a, b = self.matrix(), other.matrix().to(device=self.device, dtype=self.dtype)
        return float((a * b).sum())

    def cosine(self, other: "Delta") -> float:
        """``⟨self, other⟩ / (‖self‖ ‖other‖)``: 1 for the same direction (0 when either is zero)."""
        den = self.norm() * other.norm()
        return self.inner(other) / den if den > 0 else 0.0

    def scaled(self, factor: float) -> "Delta":
        if self.is_factored:
            return Delta(self.shape, up=self.up * factor, down=self.down)
        return Delta(self.shape, dense=self.dense * factor)

    def to_factored(self, rel_tol: float = 1e-6) -> "Delta":
        """A factored form: dense deltas go through an exact SVD, dropping singular values
        below ``rel_tol·σ_max`` (numerically zero for LoHa/LoKr products of modest rank)."""
        if self.is_factored:
            return self
        U, S, Vh = torch.linalg.svd(self.dense.double(), full_matrices=False)
        keep = max(1, int((S > rel_tol * S[0]).sum())) if S.numel() and float(S[0]) > 0 else 1
        up = (U[:, :keep] * S[:keep]).to(self.dense.dtype)
        return Delta(self.shape, up=up, down=Vh[:keep].to(self.dense.dtype))
