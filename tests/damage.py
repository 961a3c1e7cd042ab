"""Damaged copies of a real adapter file, for the tests that every one of them is refused in one sentence.

:func:`mutations` takes the bytes of a whole kohya LoRA (``.lora_up.weight`` / ``.lora_down.weight``
/ ``.alpha``) and returns :class:`Mutation` rows, each one way a file gets damaged:

* by rule — one per rule of the safetensors format that ``lorax.safetensors_io`` checks (header
  length, JSON, metadata, dtype, shape × dtype size = byte range, offsets in order, inside the data,
  without overlap, gap or trailing bytes), and one per way a valid container is a broken LoRA
  (factors missing, ranks that disagree, a 1-D factor, infinite alpha, NaN in a factor); each has
  the words the error must contain and must be refused;
* at random, on a fixed seed — byte flips in the header and in the data, truncations. Any
  truncation must be refused (the format ties the file size to the header); a flipped byte may
  leave a valid adapter (a digit of a metadata string, a mantissa bit), so those must either be
  refused or work.
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass

SEED = 23
HEADER_FLIPS = 12
DATA_FLIPS = 3
TRUNCATIONS = 6

_INF = {"F32": struct.pack("<f", float("inf")), "F16": b"\x00\x7c", "BF16": b"\x80\x7f",
        "F64": struct.pack("<d", float("inf"))}
_NAN = {"F32": struct.pack("<f", float("nan")), "F16": b"\x00\x7e", "BF16": b"\xc0\x7f",
        "F64": struct.pack("<d", float("nan"))}


@dataclass
class Mutation:
    kind: str
    data: bytes
    needles: tuple[str, ...] = ()   # words the one error line must contain (besides the file name)
    must_refuse: bool = True        # False: a random flip, which may leave a working adapter
    key: str | None = None          # the key the error must name, where there is one


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _tensors(header: dict) -> list[str]:
    """Tensor keys in data order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _rebuilt_without(data: bytes, drop) -> bytes:
    """The file saved again without the tensors ``drop(key)`` selects: a valid container."""
    from safetensors.torch import load, save

    header, _ = split(data)
    tensors = {k: v for k, v in load(data).items() if not drop(k)}
    return save(tensors, metadata=header.get("__metadata__"))


def _edit(data: bytes, change) -> bytes:
    header, body = split(data)
    change(header)
    return join(header, body)


def _poke(data: bytes, key: str, value: bytes) -> bytes:
    """``value`` written over the first element of tensor ``key``."""
    header, body = split(data)
    n = 8 + len(data) - 8 - len(body)
    start = n + header[key]["data_offsets"][0]
    return data[:start] + value + data[start + len(value):]


def mutations(data: bytes) -> list[Mutation]:
    header, body = split(data)
    keys = _tensors(header)
    ups = sorted(k for k in keys if k.endswith(".lora_up.weight"))
    alphas = sorted(k for k in keys if k.endswith(".alpha"))
    assert ups and alphas, "a kohya LoRA with alphas is needed"
    up = ups[0]
    last = keys[-1]
    big = next(k for k in keys if len(header[k]["shape"]) >= 2)
    second = keys[1]
    m, r = header[up]["shape"][:2]
    assert r % 2 == 0, "an even rank is needed for the rank mutation"
    n = len(data) - len(body) - 8

    def set_field(key, field, value):
        return lambda h: h[key].__setitem__(field, value)

    def shifted(key, by):
        return lambda h: h[key].__setitem__("data_offsets", [o + by for o in h[key]["data_offsets"]])

    out = [
        Mutation("empty file", b"", ("too short for a header",)),
        Mutation("huge header length", struct.pack("<Q", 2**62) + data[8:], ("header length of",)),
        Mutation("header length beyond the file", struct.pack("<Q", len(data)) + data[8:], ("truncated",)),
        Mutation("cut inside the header", data[:8 + n // 2], ("truncated",)),
        Mutation("header does not start with {", data[:8] + b"[" + data[9:], ("no JSON header",)),
        Mutation("header not JSON", data[:8] + b"{" + b"\xff" * (n - 1) + body, ("not JSON",)),
        Mutation("metadata not strings", _edit(data, lambda h: h.__setitem__("__metadata__", {"ss_x": 1})),
                 ("metadata must map names to strings",), key="__metadata__"),
        Mutation("unknown dtype", _edit(data, set_field(big, "dtype", "F33")), ("unknown dtype 'F33'",), key=big),
        Mutation("shape larger than its byte range",
                 _edit(data, set_field(big, "shape", [header[big]["shape"][0] * 2] + header[big]["shape"][1:])),
                 ("needs", "bytes but its data_offsets"), key=big),
        Mutation("shape smaller than its byte range",
                 _edit(data, set_field(big, "shape", [header[big]["shape"][0] - 1] + header[big]["shape"][1:])),
                 ("needs", "bytes but its data_offsets"), key=big),
        Mutation("malformed data_offsets", _edit(data, set_field(big, "data_offsets", [0])),
                 ("malformed data_offsets",), key=big),
        Mutation("negative shape", _edit(data, set_field(big, "shape", [-1] + header[big]["shape"][1:])),
                 ("malformed shape",), key=big),
        Mutation("data_offsets missing", _edit(data, lambda h: h[big].pop("data_offsets")),
                 ("no data_offsets",), key=big),
        Mutation("reversed data offsets",
                 _edit(data, set_field(big, "data_offsets", header[big]["data_offsets"][::-1])),
                 ("reversed",), key=big),
        Mutation("overlapping data offsets", _edit(data, shifted(second, -2)), ("overlap",), key=second),
        Mutation("gap between tensors", join(_edit_header(header, shifted(last, 4)), body + b"\0" * 4),
                 ("unused",), key=last),
        Mutation("bytes after the last tensor", data + b"\0" * 16, ("bytes after the last tensor",)),
        Mutation("data truncated", data[:-100], ("file is truncated",)),
        Mutation("ranks of the two factors disagree", _edit(data, set_field(up, "shape", [m * 2, r // 2])),
                 ("ranks disagree",), key=up),
        Mutation("one-dimensional factor", _edit(data, set_field(up, "shape", [m * r])),
                 ("at least two dimensions",), key=up),
        Mutation("infinite alpha", _poke(data, alphas[0], _INF[header[alphas[0]]["dtype"]]), ("NaN or inf",),
                 key=alphas[0]),
        Mutation("NaN in a factor", _poke(data, up, _NAN[header[up]["dtype"]]), ("NaN or inf",), key=up),
        Mutation("every up half missing", _rebuilt_without(data, lambda k: k.endswith(".lora_up.weight")),
                 ("no up factor", f"all {len(ups)} modules lack theirs", "damaged")),
        Mutation("every down half missing", _rebuilt_without(data, lambda k: k.endswith(".lora_down.weight")),
                 ("no down factor", f"all {len(ups)} modules lack theirs", "damaged")),
        Mutation("one up half missing", _rebuilt_without(data, lambda k: k == up),
                 ("no up factor", f"1 of {len(ups)} modules lack theirs"), key=up.replace("lora_up", "lora_down")),
    ]
    rng = random.Random(SEED)
    for i in range(HEADER_FLIPS):
        at = rng.randrange(8, 8 + n)
        out.append(Mutation(f"header byte {at} flipped ({i})", _flip(data, at, rng), must_refuse=False))
    for i in range(DATA_FLIPS):
        at = rng.randrange(8 + n, len(data))
        out.append(Mutation(f"data byte {at} flipped ({i})", _flip(data, at, rng), must_refuse=False))
    for i in range(TRUNCATIONS):
        size = rng.randrange(0, len(data))
        out.append(Mutation(f"truncated to {size} bytes ({i})", data[:size]))
    return out


def _edit_header(header: dict, change) -> dict:
    h = json.loads(json.dumps(header))
    change(h)
    return h


def _flip(data: bytes, at: int, rng: random.Random) -> bytes:
    return data[:at] + bytes([data[at] ^ rng.randrange(1, 256)]) + data[at + 1:]
