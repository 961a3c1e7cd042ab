"""Is an ordinary LoRA file whole? Its factor pairs, checked by name and shape before the host parses it.

A LoRA module is two factors, ``up`` (``[out, r, …]``) and ``down`` (``[r, in, …]``), under one
of the names ComfyUI's LoRA loader reads (kohya's ``lora_up``/``lora_down``, diffusers' and
PEFT's ``lora_B``/``lora_A``, …), and optionally a one-number ``alpha``. The host's parser looks
for the ``up`` name first: a module whose ``up`` is missing is silently left out (so a file with
every ``up`` gone "matches no layer", as an adapter for another architecture does), one whose
``down`` is missing ends in a ``KeyError``, and factors of different ranks fail inside the first
matrix product. This check tells the user instead that the file is damaged, naming the key.

It needs names and shapes only (the safetensors header, or the tensors of a pickled file), so it
runs before any tensor is read.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from .errors import LoraxError
from .safetensors_io import check_safetensors_file, is_pickle_name

#: (up suffix, down suffix) of every factor naming the host's LoRA loader reads, most specific first.
FACTOR_NAMES = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora_B", ".lora_A"),
)

_AGAIN = "the file is damaged (not made for another model); download or export it again"


def _factor(key: str) -> tuple[str, int, int] | None:
    """``(module, naming index, 0 for up / 1 for down)`` of a factor key, or None."""
    for i, pair in enumerate(FACTOR_NAMES):
        for side, suffix in enumerate(pair):
            if key.endswith(suffix) and len(key) > len(suffix):
                return key[:-len(suffix)], i, side
    return None


def check_lora_factors(shapes: Mapping[str, Sequence[int]], path: str | os.PathLike | None = None) -> None:
    """Raise a :class:`LoraxError` naming the first broken module of an ordinary LoRA.

    ``shapes`` maps every tensor name of the file to its shape. Broken: a factor whose partner
    is missing, a factor with fewer than two dimensions, ``up`` and ``down`` of different ranks
    (or of rank 0), an ``alpha`` that is not one number.
    """
    halves: dict[tuple[str, int], dict[int, str]] = {}
    for key in shapes:
        found = _factor(key)
        if found is not None:
            module, naming, side = found
            halves.setdefault((module, naming), {})[side] = key
    lone = {(module, naming): sides for (module, naming), sides in halves.items() if len(sides) == 1}
    if lone:
        (module, naming), sides = min(lone.items())
        (side, key), = sides.items()
        have, want = ("up", "down") if side == 0 else ("down", "up")
        partner = module + FACTOR_NAMES[naming][1 - side]
        count = sum(1 for s in lone.values() if side in s)
        share = (f"all {len(halves)} modules lack theirs" if count == len(halves) else
                 f"{count} of {len(halves)} modules lack theirs")
        raise LoraxError(f"this LoRA module has its {have} factor but no {want} factor ('{partner}'; {share}); "
                         f"{_AGAIN}", path=path, key=key)
    for (module, naming), sides in sorted(halves.items()):
        up_key, down_key = sides[0], sides[1]
        up, down = tuple(shapes[up_key]), tuple(shapes[down_key])
        for key, shape in ((up_key, up), (down_key, down)):
            if len(shape) < 2:
                raise LoraxError(f"a LoRA factor needs at least two dimensions, this one has shape {list(shape)}; "
                                 f"{_AGAIN}", path=path, key=key)
        if up[1] != down[0] or down[0] == 0:
            raise LoraxError(f"the factors' ranks disagree: up {list(up)} has rank {up[1]} but down {list(down)} "
                             f"has rank {down[0]} (they must be equal and positive); {_AGAIN}", path=path, key=up_key)
    for key, shape in shapes.items():
        if key.endswith(".alpha") and math.prod(shape) != 1:
            raise LoraxError(f"alpha must be one number, this one has shape {list(shape)}; {_AGAIN}",
                             path=path, key=key)


def check_adapter_header(header: Mapping[str, Mapping], path: str | os.PathLike | None = None) -> None:
    """:func:`check_lora_factors` on a safetensors header (:func:`lorax.safetensors_io.check_safetensors_file`)."""
    check_lora_factors({k: v["shape"] for k, v in header.items() if k != "__metadata__"}, path)


def check_adapter_file(path: str | os.PathLike) -> None:
    """Every check of an adapter file that needs no tensor read: the container (safetensors files)
    and the factor pairs. A pickled file (``.pt``, ``.ckpt``…) is checked once it is loaded."""
    if not is_pickle_name(path):
        check_adapter_header(check_safetensors_file(path), path)
