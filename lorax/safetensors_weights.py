"""Weights read layer by layer from safetensors files, so a second model need not sit in memory.

A :class:`SafetensorsWeights` is a :class:`lorax.transfer.WeightSource` over one checkpoint or
diffusion-model file: shapes come from the header, and each tensor is read (memory-mapped, then
copied) only when asked for and dropped by the caller after use. Checkpoint prefixes
(``model.diffusion_model.``) are mapped to the ``diffusion_model.`` keys ComfyUI's models use.

Quantized files are read as the matrix the model computes with, or refused in one sentence:
legacy "scaled fp8" checkpoints (a ``scaled_fp8`` marker, per-layer ``scale_weight``) and fp8
layers with a per-tensor ``weight_scale`` (ComfyUI's ``comfy_quant`` / ``_quantization_metadata``
float8 formats) are multiplied out here; any other ``comfy_quant`` layout (NVFP4, MXFP8, INT8…)
needs that layout's own dequantization, which only ComfyUI has — load such a file through the
nodes or ``python -m lorax``, which read it through the host.
"""

from __future__ import annotations

import os

import torch

from .errors import LoraxError
from .safetensors_io import check_safetensors_file, open_safetensors
from .weight_formats import UnreadableWeight, dense_weight

_CHECKPOINT_PREFIX = "model.diffusion_model."


class SafetensorsWeights:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        header = check_safetensors_file(self.path)
        st = os.stat(self.path)
        self._file_identity = f"{os.path.abspath(self.path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self._file_key: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            model_key = key
            if key.startswith(_CHECKPOINT_PREFIX):
                model_key = "diffusion_model." + key[len(_CHECKPOINT_PREFIX):]
            elif not key.startswith(("diffusion_model.", "cond_stage_model.", "first_stage_model.",
                                     "conditioner.", "text_encoders.")):
                model_key = "diffusion_model." + key
            self._file_key[model_key] = key
            self._shapes[model_key] = tuple(int(d) for d in info["shape"])

    @property
    def origin(self) -> str:
        """The model these weights belong to, for the SVD cache's listing: the file's absolute path."""
        return os.path.abspath(self.path)

    def keys(self):
        return self._shapes.keys()

    def shape(self, key: str):
        return self._shapes.get(key)

    def identity(self, key: str) -> str | None:
        """Changes whenever this tensor's bytes may have: the file's identity plus its header entry."""
        file_key = self._file_key.get(key)
        if file_key is None:
            return None
        e = self._entries[file_key]
        return f"{self._file_identity}|{file_key}|{e['dtype']}|{e['shape']}|{e['data_offsets']}"

    def weight(self, key: str) -> torch.Tensor:
        if key not in self._file_key:
            raise LoraxError("no such tensor in the file", path=self.path, key=key)
        file_key = self._file_key[key]
        with open_safetensors(self.path) as f:
            weight = f.get_tensor(file_key)
            stem = file_key[:-len(".weight")] if file_key.endswith(".weight") else None
            if stem is None:
                return dense_weight(weight, key=key, path=self.path)
            names = set(self._entries)
            if stem + ".comfy_quant" in names:
                conf = _quant_format(f.get_tensor(stem + ".comfy_quant"))
                if conf not in ("float8_e4m3fn", "float8_e5m2"):
                    raise UnreadableWeight(
                        f"the layer is stored in ComfyUI's quantized format '{conf}', whose dequantization "
                        "only the host has; load the file through the LoRA-X nodes or `python -m lorax`",
                        key=key, path=self.path)
            for scale_key in (stem + ".scale_weight", stem + ".weight_scale"):
                if scale_key in names and weight.element_size() == 1:
                    scale = f.get_tensor(scale_key).float()
                    if scale.numel() != 1:
                        raise UnreadableWeight(
                            f"the fp8 layer has a {tuple(scale.shape)} scale ({scale_key}); only per-tensor "
                            "scales are read from files; load it through the LoRA-X nodes", key=key, path=self.path)
                    return weight.float() * scale.reshape(())
            return dense_weight(weight, key=key, path=self.path)


def _quant_format(conf: torch.Tensor) -> str:
    """The ``format`` of a ``comfy_quant`` entry (JSON bytes in a uint8 tensor)."""
    import json

    try:
        return str(json.loads(bytes(conf.to(torch.uint8).tolist()).decode("utf-8")).get("format"))
    except (ValueError, AttributeError):
        return "unreadable comfy_quant entry"
