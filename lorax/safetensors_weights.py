"""Weights read layer by layer from safetensors files, so a second model need not sit in memory.

A :class:`SafetensorsWeights` is a :class:`lorax.transfer.WeightSource` over one checkpoint or
diffusion-model file: shapes come from the header, and each tensor is read (memory-mapped, then
copied) only when asked for and dropped by the caller after use. Checkpoint prefixes
(``model.diffusion_model.``) are mapped to the ``diffusion_model.`` keys ComfyUI's models use.
"""

from __future__ import annotations

import os

import torch

from .errors import LoraxError
from .safetensors_io import check_safetensors_file, open_safetensors

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
        with open_safetensors(self.path) as f:
            return f.get_tensor(self._file_key[key])
