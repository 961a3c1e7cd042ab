"""LoRA-X adapters (the seed's Step 1 object) and their file format.

A LoRA-X adapter changes only the top-r singular values of each adapted source weight::

    W_s = U_s Σ_s V_sᵀ,     ΔW_s = U_s,r diag(Δσ) V_s,rᵀ

so it is r numbers per layer; ``U_s,r`` and ``V_s,r`` are not stored but recomputed from the
source weight (through the SVD engine and its cache). Because of that, the adapter is only
meaningful on the exact source it was made for, and the file carries a sketch of every source
weight (:func:`lorax.fingerprint.weight_sketch`) that is checked before use.

File format (safetensors, ``lorax_version = "1"``):

* ``<module>.lorax_sigma`` — float32 ``[r_layer]``: Δσ for one layer. ``<module>`` is the
  kohya-style module name, e.g. ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``.
* ``<module>.lorax_source_sketch`` — float64 ``[9]``: the source weight's sketch (norm and
  eight random probes, :func:`lorax.fingerprint.weight_sketch`).
* metadata: ``lorax_version``, ``lorax_rank`` (largest r), ``lorax_source_fingerprint`` (a short
  digest of all sketches, for display and cache keys), ``lorax_source`` (free text: the source
  model's name), plus anything the writer adds (``ss_base_model_version``, …).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .delta import Delta
from .errors import LoraxError
from .fingerprint import SKETCH_SIZE, sketch_tolerance, sketches_match, weight_sketch
from .safetensors_io import atomic_save, ensure_finite, load_tensors, read_metadata
from .svd import SVDFactors, max_rank

FORMAT_VERSION = "1"
SIGMA_SUFFIX = ".lorax_sigma"
SKETCH_SUFFIX = ".lorax_source_sketch"


@dataclass
class LoraxAdapter:
    """Δσ per module (kohya-style module name), with the source sketches that validate it."""

    sigmas: dict[str, torch.Tensor]
    sketches: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    @property
    def rank(self) -> int:
        return max((int(s.numel()) for s in self.sigmas.values()), default=0)

    @property
    def parameter_count(self) -> int:
        return sum(int(s.numel()) for s in self.sigmas.values())

    @property
    def source_fingerprint(self) -> str:
        return sketch_digest(self.sketches)

    def check_source(self, module: str, weight: torch.Tensor) -> None:
        """Raise if ``weight`` is not the source weight this layer was made for."""
        r = int(self.sigmas[module].numel())
        if r > max_rank(weight.shape):
            raise LoraxError(f"the adapter has rank {r} here but the model's weight of shape "
                             f"{tuple(weight.shape)} has rank at most {max_rank(weight.shape)}; "
                             "this adapter was made for another architecture", path=self.path, key=module)
        stored = self.sketches.get(module)
        if stored is not None and not sketches_match(stored, weight_sketch(weight), sketch_tolerance(weight.dtype)):
            raise LoraxError("the model is not the source this LoRA-X adapter was made for (weight "
                             "fingerprint differs); connect the adapter's source checkpoint as the "
                             "source model, and use LoRA-X Transfer to move it to other checkpoints",
                             path=self.path, key=module)

    def delta(self, module: str, source: SVDFactors, shape) -> Delta:
        """``U_s,r diag(Δσ) V_s,rᵀ`` from the source factors (at least r triplets)."""
        sigma = self.sigmas[module].to(device=source.U.device, dtype=source.U.dtype)
        f = source.top(int(sigma.numel()))
        return Delta(tuple(shape), up=f.U * sigma, down=f.V.mT.contiguous())


def sketch_digest(sketches: Mapping[str, torch.Tensor]) -> str:
    """A short digest of rounded sketches: equal for the same source in fp32 and fp16."""
    h = hashlib.blake2b(digest_size=8)
    for key in sorted(sketches):
        norm = float(sketches[key][0])
        h.update(f"{key}:{norm:.2e};".encode())
    return h.hexdigest()


def save_lorax(path: str | os.PathLike, adapter: LoraxAdapter, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``adapter`` atomically (see the module docstring for the layout)."""
    if not adapter.sigmas:
        raise LoraxError("refusing to write an empty LoRA-X adapter (no layers)", path=path)
    tensors: dict[str, torch.Tensor] = {}
    for module, sigma in adapter.sigmas.items():
        tensors[module + SIGMA_SUFFIX] = sigma.detach().float().reshape(-1)
        if module in adapter.sketches:
            tensors[module + SKETCH_SUFFIX] = adapter.sketches[module].detach().double().reshape(-1)
    ensure_finite(tensors, path)
    meta = {**adapter.metadata, **(metadata or {})}
    meta.update({"lorax_version": FORMAT_VERSION, "lorax_rank": str(adapter.rank),
                 "lorax_layers": str(len(adapter.sigmas)),
                 "lorax_source_fingerprint": adapter.source_fingerprint})
    atomic_save(tensors, path, meta)


def is_lorax_file(path: str | os.PathLike) -> bool:
    """Whether the safetensors file at ``path`` is a LoRA-X adapter (by its metadata)."""
    return "lorax_version" in read_metadata(path)


def load_lorax(path: str | os.PathLike) -> LoraxAdapter:
    """Read and validate a LoRA-X file."""
    path = os.fspath(path)
    meta = read_metadata(path)
    version = meta.get("lorax_version")
    if version is None:
        raise LoraxError("not a LoRA-X adapter (no 'lorax_version' metadata); ordinary LoRA files are "
                         "read with the host's LoRA loader instead", path=path)
    if version != FORMAT_VERSION:
        raise LoraxError(f"LoRA-X format version {version!r} is not supported (this version reads "
                         f"{FORMAT_VERSION!r}); update the LoRA-X node pack", path=path)
    tensors = load_tensors(path)
    sigmas, sketches = {}, {}
    for key, t in tensors.items():
        if key.endswith(SIGMA_SUFFIX):
            if t.dim() != 1 or t.numel() == 0:
                raise LoraxError(f"expected a non-empty 1-D vector of singular value changes, got shape "
                                 f"{tuple(t.shape)}", path=path, key=key)
            sigmas[key[:-len(SIGMA_SUFFIX)]] = t.float()
        elif key.endswith(SKETCH_SUFFIX):
            if t.numel() != SKETCH_SIZE:
                raise LoraxError(f"expected {SKETCH_SIZE} numbers, got shape {tuple(t.shape)}", path=path, key=key)
            sketches[key[:-len(SKETCH_SUFFIX)]] = t.double().reshape(-1)
        else:
            raise LoraxError(f"unexpected tensor in a LoRA-X file (expected names ending in "
                             f"'{SIGMA_SUFFIX}' or '{SKETCH_SUFFIX}')", path=path, key=key)
    if not sigmas:
        raise LoraxError("the LoRA-X file holds no layers", path=path)
    extra = {k: v for k, v in meta.items()}
    return LoraxAdapter(sigmas=sigmas, sketches=sketches, metadata=extra, path=path)


def describe(adapter: LoraxAdapter) -> str:
    return json.dumps({"layers": len(adapter.sigmas), "rank": adapter.rank,
                       "parameters": adapter.parameter_count,
                       "source_fingerprint": adapter.source_fingerprint})
