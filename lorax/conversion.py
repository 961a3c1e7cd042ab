"""Converting an ordinary adapter into a LoRA-X adapter, without data.

A LoRA-X adapter can only change the source's top-r singular values, so the best it can do with
an arbitrary delta is its orthogonal projection onto the ``r`` rank-one directions ``u_i v_iᵀ``
(orthonormal in the Frobenius inner product)::

    Δσ_i = u_iᵀ ΔW v_i,        kept = ‖U diag(Δσ) Vᵀ‖_F / ‖ΔW‖_F = ‖Δσ‖ / ‖ΔW‖_F,
    residual = ‖ΔW − U diag(Δσ) Vᵀ‖_F / ‖ΔW‖_F = √(1 − kept²)

A LoRA whose delta is exactly ``U_r diag(d) V_rᵀ`` converts losslessly; a generic LoRA (whose
factors point anywhere) keeps little, and the report says so honestly per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from .delta import Delta
from .engine import SVDEngine
from .fingerprint import weight_sketch
from .fused import with_slices
from .lorax_adapter import LoraxAdapter
from .svd import SVDFactors, max_rank
from .transfer import WeightSource


def sigma_projection(delta: Delta, source: SVDFactors) -> torch.Tensor:
    """``Δσ_i = u_iᵀ ΔW v_i`` for the ``k`` triplets of ``source`` (factored: no m×n product)."""
    d = delta.to(device=source.U.device, dtype=source.U.dtype)
    if d.is_factored:
        return ((source.U.mT @ d.up) * (d.down @ source.V).mT).sum(dim=1)
    return ((source.U.mT @ d.dense) * source.V.mT).sum(dim=1)


@dataclass(frozen=True)
class ConvertedLayer:
    key: str
    module: str
    rank: int
    kept: float
    residual: float

    def row(self) -> dict:
        return {"key": self.key, "module": self.module, "rank": self.rank,
                "kept": round(self.kept, 6), "residual": round(self.residual, 6)}


@torch.no_grad()
def convert_deltas(deltas: Mapping[str, Delta], modules: Mapping[str, str], source: WeightSource, rank: int,
                   engine: SVDEngine, metadata: Mapping[str, str] | None = None
                   ) -> tuple[LoraxAdapter, list[ConvertedLayer]]:
    """LoRA-X adapter (``Δσ`` per module, r = min(rank, layer rank)) and a per-layer report.

    ``deltas`` are keyed by model key; ``modules`` maps model keys to the module names written to
    the file; keys may be slice keys of fused weights (:mod:`lorax.fused`). Layers that are not
    matrices are left out of both.
    """
    source = with_slices(source)
    sigmas, sketches, layers = {}, {}, []
    keys = [k for k in deltas if len(deltas[k].shape) >= 2]
    ks = [min(rank, max_rank(deltas[k].shape)) for k in keys]
    weights = {k: source.weight(k) for k in keys}
    factors = engine.factors_many([(weights[k], r) for k, r in zip(keys, ks)])
    for key, r, f in zip(keys, ks, factors):
        sigma = sigma_projection(deltas[key], f)
        total = deltas[key].to(dtype=f.U.dtype).norm()
        kept = float(torch.linalg.vector_norm(sigma)) / total if total > 0 else 0.0
        kept = min(kept, 1.0)
        module = modules[key]
        sigmas[module] = sigma.float().cpu()
        sketches[module] = weight_sketch(weights[key])
        layers.append(ConvertedLayer(key, module, r, kept, math.sqrt(max(0.0, 1.0 - kept * kept))))
    return LoraxAdapter(sigmas=sigmas, sketches=sketches, metadata=dict(metadata or {})), layers


def conversion_summary(layers: list[ConvertedLayer]) -> str:
    if not layers:
        return "no layer converted"
    kept = sorted(l.kept for l in layers)
    worst = min(layers, key=lambda l: l.kept)
    return (f"{len(layers)} layers converted; delta energy kept: median {100 * kept[len(kept) // 2]:.1f} %, "
            f"lowest {100 * worst.kept:.1f} % ({worst.module}). A LoRA-X adapter can only change the source's "
            f"top-r singular values: what is not kept is lost.")
