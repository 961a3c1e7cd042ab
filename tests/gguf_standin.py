"""GGUF weights the way ComfyUI-GGUF hands them to a model, for CI.

ComfyUI-GGUF (the node pack users load GGUF files with) is published on GitHub and the Comfy
Registry only, neither of which CI can reach, so CI cannot install it. What the pack hands the
model is small and documented by its source: a ``torch.Tensor`` subclass holding the file's
packed bytes (``uint8``, shape ``rows × bytes``; F32/F16 tensors already viewed to their shape)
that carries ``tensor_type`` (a ``gguf.GGMLQuantizationType``), ``tensor_shape`` (the logical
shape, which its ``shape`` property reports) and ``patches`` (LoRA patches it applies on the fly).
:class:`PackedGGUF` carries exactly that; the bytes come from the real ``gguf`` package (from a
file written with ``gguf.GGUFWriter`` and read back with ``gguf.GGUFReader``), never from us.

The same tests run against the real pack by hand (``LORAX_COMFYUI_GGUF=<checkout>``; see
``scripts/check-current-host``), where its own ``UnetLoaderGGUF`` makes the tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch


class PackedGGUF(torch.Tensor):
    """Packed GGUF bytes with ``tensor_type``, ``tensor_shape`` and ``patches`` (module docstring)."""

    @staticmethod
    def __new__(cls, data, *, tensor_type, tensor_shape):
        return torch.Tensor._make_subclass(cls, data, False)

    def __init__(self, data, *, tensor_type, tensor_shape):
        self.tensor_type = tensor_type
        self.tensor_shape = torch.Size(tensor_shape)
        self.patches = []

    @property
    def shape(self):
        return self.tensor_shape

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Keep the GGUF attributes on what detach / to / Parameter make of the tensor, as the pack does.
        out = super().__torch_function__(func, types, args, kwargs or {})
        src = args[0] if args and isinstance(args[0], PackedGGUF) else None
        if isinstance(out, PackedGGUF) and src is not None and not hasattr(out, "tensor_type"):
            out.tensor_type, out.tensor_shape, out.patches = src.tensor_type, src.tensor_shape, list(src.patches)
        return out


def write_gguf(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], qtype, *,
               arch: str = "sd1") -> Path:
    """A GGUF file of ``tensors`` (2-D+ weights whose last dimension fits the block size in
    ``qtype``, everything else F32), written by ``gguf.GGUFWriter``."""
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), arch)
    for key, t in tensors.items():
        arr = t.detach().float().numpy()
        if arr.ndim >= 2 and arr.shape[-1] % block == 0 and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(arr, qtype)
            writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(key, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def read_gguf(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The file's tensors as ComfyUI-GGUF's loader makes them (packed bytes + type + shape)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        shape = tuple(int(v) for v in reversed(tensor.shape))
        data = torch.from_numpy(np.array(tensor.data))
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = data.view(*shape)
        out[tensor.name] = PackedGGUF(data, tensor_type=tensor.tensor_type, tensor_shape=shape)
    return out


def packed_tensor(weight: torch.Tensor, qtype) -> PackedGGUF:
    """One weight quantized by the ``gguf`` package, as the loader would hand it out."""
    import gguf

    data = gguf.quants.quantize(weight.detach().float().numpy(), qtype)
    raw = torch.from_numpy(np.ascontiguousarray(data))
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        raw = raw.view(*weight.shape)
    return PackedGGUF(raw, tensor_type=qtype, tensor_shape=tuple(weight.shape))


def crafted_tensor(shape: tuple[int, ...], qtype, seed: int = 0) -> PackedGGUF:
    """A valid tensor of a type the ``gguf`` package dequantizes but cannot quantize (K-quants, IQ):
    random bytes below 0x78, so that every float16 scale they form is finite."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1]))
    g = np.random.default_rng(seed)
    raw = g.integers(0, 0x78, size=(rows, shape[-1] // block * size), dtype=np.uint8)
    return PackedGGUF(torch.from_numpy(raw), tensor_type=qtype, tensor_shape=shape)


def gguf_model(path: str | os.PathLike, qtype, keys=None):
    """The diffusion model in the safetensors file ``path``, loaded by the host's own loader, with
    its matrix weights replaced by packed GGUF tensors of ``qtype`` (a fresh model: nothing else is
    touched). Returns ``(patcher, replaced keys)``."""
    import comfy.sd
    import comfy.utils
    import gguf

    patcher = comfy.sd.load_diffusion_model(str(path))
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    replaced = []
    for key, p in list(patcher.model.state_dict(keep_vars=True).items()):
        if keys is not None and key not in keys:
            continue
        if p.ndim == 2 and p.shape[-1] % block == 0:
            comfy.utils.set_attr_param(patcher.model, key, packed_tensor(p.detach(), qtype))
            replaced.append(key)
    return patcher, replaced
