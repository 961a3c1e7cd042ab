"""Reading and writing safetensors files safely.

Reads fail with a :class:`LoraxError` that names the file and key (missing, not safetensors,
truncated, a damaged header — :func:`check_safetensors_file` checks every rule of the format before
any tensor is read —, non-finite values) instead of a bare ``safetensors_rust`` exception. Writes go to a temporary
file in the destination folder and are renamed into place, so an interrupted or failed write
never leaves a half-written adapter where a user (or ComfyUI's file list) would pick it up.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import LoraxError

#: The largest header the safetensors loader reads (its ``MAX_HEADER_SIZE``).
_MAX_HEADER_BYTES = 100_000_000

#: Bits per element of every dtype name the safetensors format defines.
#: (safetensors 0.8: F6_* pass its header check but torch has no such dtype; :func:`read_tensor` says so.)
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}

_NOT_SAFETENSORS = "only .safetensors files are supported, convert .ckpt/.pt files first"
_DAMAGED = "the file is damaged; download or export it again"


def check_safetensors_file(path: str | os.PathLike) -> dict:
    """Validate the container of ``path`` and return its JSON header.

    Checks, before any tensor is read, everything the safetensors format defines, so that no
    damaged file reaches the loader (whose errors name neither the file nor the key): the header
    length (at most 100 MB and within the file), a UTF-8 JSON object, ``__metadata__`` a map of
    strings to strings, and for every tensor a dtype among the format's names, a shape of
    non-negative integers, and ``data_offsets`` ``[begin, end]`` with ``end - begin`` = elements
    × dtype size; the tensors' byte ranges, in order, must tile the data exactly (no overlap, no
    gap, nothing beyond the file's end, nothing after the last tensor). A missing file, a file
    that is not safetensors at all (a ``.ckpt`` pickle renamed, an HTML error page) and a
    truncated download get their own sentences.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoraxError("file not found; check the path (ComfyUI lists files of its 'loras', "
                         "'checkpoints' and 'diffusion_models' folders)", path=path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraxError(f"not a safetensors file ({size} bytes, too short for a header); {_NOT_SAFETENSORS}",
                             path=path)
        (header_len,) = struct.unpack("<Q", head)
        if header_len <= 1 or header_len > _MAX_HEADER_BYTES:
            raise LoraxError(f"not a safetensors file (no valid header: its first 8 bytes give a header length of "
                             f"{header_len} bytes, the format allows 2 to {_MAX_HEADER_BYTES}); {_NOT_SAFETENSORS}",
                             path=path)
        raw = f.read(header_len)
    if not raw.startswith(b"{"):
        raise LoraxError(f"not a safetensors file (no JSON header); {_NOT_SAFETENSORS}", path=path)
    if len(raw) < header_len:
        raise LoraxError(f"file is truncated: its header alone needs {header_len} bytes but only {len(raw)} "
                         "are present; download or copy the file again", path=path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraxError(f"the safetensors header is not JSON ({e}); {_DAMAGED}", path=path) from None
    if not isinstance(header, dict):
        raise LoraxError(f"the safetensors header is not a JSON object; {_DAMAGED}", path=path)
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise LoraxError(f"the header's metadata must map names to strings; {_DAMAGED}", path=path,
                         key="__metadata__")
    data_len = size - 8 - header_len
    ranges = []
    for key, info in header.items():
        if key != "__metadata__":
            ranges.append((*_byte_range(info, path, key), key))
    end = max((e for _, e, _ in ranges), default=0)
    if end > data_len:
        raise LoraxError(f"file is truncated: the header needs {end} data bytes but only {data_len} "
                         "are present; download or copy the file again", path=path)
    ranges.sort()
    at, previous = 0, None
    for begin, stop, key in ranges:
        if begin < at:
            raise LoraxError(f"data_offsets [{begin}, {stop}] overlap those of '{previous}', which end at byte {at}; "
                             f"{_DAMAGED}", path=path, key=key)
        if begin > at:
            raise LoraxError(f"data_offsets [{begin}, {stop}] leave bytes {at} to {begin} of the data unused (the "
                             f"format has no gaps); {_DAMAGED}", path=path, key=key)
        at, previous = stop, key
    if at != data_len:
        raise LoraxError(f"the file has {data_len - at} bytes after the last tensor's data (the format allows "
                         f"none); {_DAMAGED}", path=path)
    return header


def _byte_range(info, path: str, key: str) -> tuple[int, int]:
    """``(begin, end)`` of one tensor's header entry, checked against its dtype and shape."""
    def is_count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(info, dict):
        raise LoraxError(f"malformed safetensors header entry (expected {{\"dtype\", \"shape\", "
                         f"\"data_offsets\"}}, got {type(info).__name__}); {_DAMAGED}", path=path, key=key)
    missing = [field for field in ("dtype", "shape", "data_offsets") if field not in info]
    if missing:
        raise LoraxError(f"malformed safetensors header entry (no {' and no '.join(missing)}); {_DAMAGED}",
                         path=path, key=key)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise LoraxError(f"unknown dtype {dtype!r} (the safetensors format defines {', '.join(DTYPE_BITS)}); "
                         f"{_DAMAGED}", path=path, key=key)
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise LoraxError(f"malformed shape {shape!r} (expected a list of non-negative integers); {_DAMAGED}",
                         path=path, key=key)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        raise LoraxError(f"malformed data_offsets {offsets!r} (expected [begin, end], two non-negative "
                         f"integers); {_DAMAGED}", path=path, key=key)
    begin, end = offsets
    if end < begin:
        raise LoraxError(f"data_offsets [{begin}, {end}] are reversed (the end lies before the start); {_DAMAGED}",
                         path=path, key=key)
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    if bits != 8 * (end - begin):
        need = f"{bits // 8}" if bits % 8 == 0 else f"{bits / 8:g}"
        raise LoraxError(f"a {dtype} tensor of shape {shape} needs {need} bytes but its data_offsets [{begin}, "
                         f"{end}] hold {end - begin}; {_DAMAGED}", path=path, key=key)
    return begin, end


#: Adapter files read with torch's unpickler; everything else is read as safetensors.
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")


def is_pickle_name(path: str | os.PathLike) -> bool:
    """Whether a file is read as a PyTorch pickle (by its name) rather than as safetensors."""
    name = os.fspath(path)
    return not name.endswith(".safetensors") and name.endswith(PICKLE_SUFFIXES)


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
            out[key] = read_tensor(f, key, path)
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


def read_tensor(handle, key: str, path: str | os.PathLike) -> torch.Tensor:
    """``handle.get_tensor(key)`` of an :func:`open_safetensors` handle, with an error that names the
    file and key (after :func:`check_safetensors_file`, what is left is a dtype torch lacks)."""
    try:
        return handle.get_tensor(key)
    except Exception as e:  # the binding's own error types
        raise LoraxError(f"this tensor cannot be read into torch ({e}); save the file with a dtype torch "
                         "supports (F16, BF16, F32…)", path=path, key=key) from None


def ensure_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike | None) -> None:
    """Raise on the first tensor holding NaN or inf: a diverged training run, not an adapter."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            continue
        if t.element_size() == 1:  # float8: torch has no isfinite for it
            t = t.float()
        if not bool(torch.isfinite(t).all()):
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
