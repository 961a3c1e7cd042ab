"""Writing deltas as a standard kohya LoRA file that every tool loads unchanged.

Per module: ``<name>.lora_down.weight`` (``r × in``, or ``r × in × kh × kw`` for convs),
``<name>.lora_up.weight`` (``out × r``, or ``out × r × 1 × 1``) and ``<name>.alpha = r`` so the
loader's ``alpha / r`` scale is exactly 1 and ``up @ down`` is the delta as computed. Dense deltas
(LoHa/LoKr/DoRA materialised, ProLoRA on dense input) are factored by an exact SVD at their
numerical rank first. Metadata carries what users' tools read (``ss_base_model_version``,
``modelspec.architecture``, ``ss_network_dim``…) for the *target* model, and a JSON provenance
note under ``lorax_provenance``.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import torch

from .delta import Delta
from .errors import LoraxError
from .safetensors_io import atomic_save, ensure_finite


def kohya_tensors(deltas: Mapping[str, Delta], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors of a kohya LoRA for ``{module name: delta}``."""
    out: dict[str, torch.Tensor] = {}
    for name, delta in deltas.items():
        d = delta.to_factored()
        r = d.rank
        shape = d.shape
        if len(shape) > 2:
            down = d.down.reshape(r, *shape[1:])
            up = d.up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        else:
            down, up = d.down, d.up
        out[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(r), dtype=torch.float32)
    return out


def save_kohya_lora(path: str | os.PathLike, deltas: Mapping[str, Delta], *,
                    base_model_version: str | None = None, architecture: str | None = None,
                    provenance: Mapping | None = None, metadata: Mapping[str, str] | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Write ``deltas`` atomically as a kohya LoRA; returns the metadata written."""
    if not deltas:
        raise LoraxError("nothing to save: no layer was transferred (see the transfer report for why)",
                         path=path)
    tensors = kohya_tensors(deltas, dtype)
    ensure_finite(tensors, path)
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight")})
    meta: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1]),
        "ss_network_alpha": str(ranks[-1]),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": os.path.splitext(os.path.basename(os.fspath(path)))[0],
    }
    if base_model_version:
        meta["ss_base_model_version"] = base_model_version
    if architecture:
        meta["modelspec.architecture"] = architecture
    if provenance:
        meta["lorax_provenance"] = json.dumps(dict(provenance), sort_keys=True, default=str)
    meta.update(metadata or {})
    atomic_save(tensors, path, meta)
    return meta
