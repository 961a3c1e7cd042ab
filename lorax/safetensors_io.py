"""Reading and writing safetensors files safely.

Reads fail with a :class:`LoraxError` that names the file (missing, not safetensors, truncated,
non-finite values) instead of a bare ``safetensor_rust`` exception. Writes go to a temporary
file in the destination folder and are renamed into place, so an interrupted or failed write
never leaves a half-written adapter where a user (or ComfyUI's file list) would pick it up.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import LoraxError

_MAX_HEADER_BYTES = 100 * 1024 * 1024


def check_safetensors_file(path: str | os.PathLike) -> dict:
    """Validate the container of ``path`` and return its JSON header.

    Checks what the safetensors loader reports poorly: a missing file, a file that is not
    safetensors at all (a ``.ckpt`` pickle renamed, an HTML error page) and a truncated
    download whose header promises more bytes than the file has.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoraxError("file not found; check the path (ComfyUI lists files of its 'loras', "
                         "'checkpoints' and 'diffusion_models' folders)", path=path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraxError(f"not a safetensors file ({size} bytes, too short for a header)", path=path)
        (header_len,) = struct.unpack("<Q", head)
        if header_len <= 1 or header_len > _MAX_HEADER_BYTES:
            raise LoraxError("not a safetensors file (no valid header); only .safetensors files are "
                             "supported, convert .ckpt/.pt files first", path=path)
        raw = f.read(header_len)
    if not raw.startswith(b"{"):
        raise LoraxError("not a safetensors file (no JSON header); only .safetensors files are supported, "
                         "convert .ckpt/.pt files first", path=path)
    if len(raw) < header_len:
        raise LoraxError(f"file is truncated: its header alone needs {header_len} bytes but only {len(raw)} "
                         "are present; download or copy the file again", path=path)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraxError(f"not a safetensors file (header is not JSON: {e}); only .safetensors files are "
                         "supported, convert .ckpt/.pt files first", path=path) from None
    if not isinstance(header, dict):
        raise LoraxError("not a safetensors file (header is not a JSON object)", path=path)
    data_len = size - 8 - header_len
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise LoraxError("malformed safetensors header entry", path=path, key=key) from None
    if end > data_len:
        raise LoraxError(f"file is truncated: the header needs {end} data bytes but only {data_len} "
                         "are present; download or copy the file again", path=path)
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file (empty if none)."""
    header = check_safetensors_file(path)
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def load_tensors(path: str | os.PathLike, *, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file onto the CPU, validated."""
    check_safetensors_file(path)
    out: dict[str, torch.Tensor] = {}
    with open_safetensors(path) as f:
        for key in f.keys():
            out[key] = f.get_tensor(key)
    if check_finite:
        ensure_finite(out, path)
    return out


@contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator:
    """Memory-mapped lazy reader (``safe_open``) with errors that name the file."""
    path = os.fspath(path)
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # the binding raises its own opaque error types
        raise LoraxError(f"cannot be read as safetensors: {e}", path=path) from None
    with handle as f:
        yield f


def ensure_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike | None) -> None:
    """Raise on the first tensor holding NaN or inf: a diverged training run, not an adapter."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LoraxError("tensor contains NaN or inf values; the file is damaged or came from a "
                             "diverged training run", path=path, key=key)


def atomic_save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file so that ``path`` holds either the old file or the complete new one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lorax-", suffix=".safetensors.part", dir=folder)
    os.close(fd)
    try:
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(contiguous, tmp, metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
