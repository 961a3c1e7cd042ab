"""Slices of fused weights: LoRA modules that change only part of one weight.

DiT models fuse projections that LoRA trainers keep apart. Flux stores a double block's query,
key and value as one ``img_attn.qkv`` weight (``3h × h``) and a single block's q, k, v and MLP
input as one ``linear1`` (``(3h + 4h) × h``); SD3's MMDiT fuses ``attn.qkv`` the same way. A
diffusers-format LoRA, though, has ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` modules, and the
host's key map sends each to *rows* of the fused weight: ``(key, (dim, offset, size))``.

LoRA-X treats such a slice as a layer of its own: the slice is what the module changes, so it is
the slice that is decomposed, whose subspaces are compared and onto which the delta is projected;
the patch goes back into the same rows and the rest of the fused weight is left exactly as it was.

A slice travels through the library as a *slice key*, the weight key with the rows in brackets —
``diffusion_model.double_blocks.0.img_attn.qkv.weight[0:3072]`` (``[:, a:b]`` for columns) — so
every mapping keyed by weight key (deltas, results, report rows) holds slices unchanged, and
:class:`SlicedWeights` lets any weight source answer for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .delta import Delta
from .errors import LoraxError

_SLICE = re.compile(r"^(?P<key>.+)\[(?P<lead>(?::, )*)(?P<start>\d+):(?P<stop>\d+)\]$")
#: Fused weights whose row slices have names: equal thirds are q, k, v; Flux's ``linear1`` also
#: holds the MLP input (4h rows after the 3h of q, k, v).
_FUSED_QKV = ("qkv", "linear1")


@dataclass(frozen=True)
class WeightSlice:
    """``size`` entries of ``key`` along ``dim`` from ``start`` (the host's ``(dim, offset, size)``)."""

    key: str
    dim: int
    start: int
    size: int

    def __post_init__(self):
        if self.dim < 0 or self.start < 0 or self.size < 1:
            raise ValueError(f"not a slice: dim {self.dim}, start {self.start}, size {self.size}")

    @property
    def stop(self) -> int:
        return self.start + self.size

    @property
    def name(self) -> str:
        """The slice key, e.g. ``…img_attn.qkv.weight[0:3072]``."""
        return f"{self.key}[{':, ' * self.dim}{self.start}:{self.stop}]"

    @property
    def host_offset(self) -> tuple[int, int, int]:
        """What ``ModelPatcher.add_patches`` takes as the second element of a patch key."""
        return (self.dim, self.start, self.size)

    def on(self, key: str) -> "WeightSlice":
        """The same rows of another weight (the target layer a layer map pairs with ``key``)."""
        return WeightSlice(key, self.dim, self.start, self.size)

    def fits(self, shape) -> bool:
        return len(shape) > self.dim and self.stop <= shape[self.dim]

    def shape_in(self, shape) -> tuple[int, ...]:
        out = list(shape)
        out[self.dim] = self.size
        return tuple(out)

    def take(self, weight: torch.Tensor) -> torch.Tensor:
        """A view of the slice (no copy; row slices of a contiguous weight stay contiguous)."""
        return weight.narrow(self.dim, self.start, self.size)

    @property
    def part(self) -> str:
        """``q``, ``k``, ``v`` or ``mlp`` for the known fused layouts, else ``rows a:b``."""
        module = self.key.rsplit(".", 2)[-2] if self.key.endswith(".weight") else self.key.rsplit(".", 1)[-1]
        if self.dim == 0 and module in _FUSED_QKV:
            if self.start % self.size == 0 and self.start // self.size < 3:
                return "qkv"[self.start // self.size]
            if module == "linear1" and 4 * self.start == 3 * self.size:
                return "mlp"
        return f"{'rows' if self.dim == 0 else 'columns'} {self.start}:{self.stop}"

    def describe(self) -> str:
        what = "rows" if self.dim == 0 else ("columns" if self.dim == 1 else f"entries along dim {self.dim}")
        return f"{what} {self.start}–{self.stop - 1} of the fused weight {self.key}"


def parse_slice_key(name: str) -> WeightSlice | None:
    """The slice a slice key names, or None for a plain weight key."""
    m = _SLICE.match(name)
    if m is None:
        return None
    start, stop = int(m.group("start")), int(m.group("stop"))
    if stop <= start:
        return None
    return WeightSlice(m.group("key"), len(m.group("lead")) // 3, start, stop - start)


def base_key(name: str) -> str:
    """The weight a key belongs to: the fused weight for a slice key, the key itself otherwise."""
    s = parse_slice_key(name)
    return name if s is None else s.key


def host_key(name: str):
    """The key ``ModelPatcher.add_patches`` takes: ``(weight key, (dim, offset, size))`` for a slice."""
    s = parse_slice_key(name)
    return name if s is None else (s.key, s.host_offset)


class SlicedWeights:
    """A weight source (:class:`lorax.transfer.WeightSource`) that also answers for slice keys,
    by narrowing the fused weight the wrapped source returns (a view: nothing is copied)."""

    def __init__(self, inner):
        self.inner = inner

    def keys(self):
        return self.inner.keys()

    def shape(self, key: str):
        s = parse_slice_key(key)
        if s is None:
            return self.inner.shape(key)
        full = self.inner.shape(s.key)
        return None if full is None or not s.fits(full) else s.shape_in(full)

    def weight(self, key: str) -> torch.Tensor:
        s = parse_slice_key(key)
        return self.inner.weight(key) if s is None else s.take(self.inner.weight(s.key))

    @property
    def origin(self) -> str | None:
        """The wrapped source's model label (see lorax.transfer._origin)."""
        origin = getattr(self.inner, "origin", None)
        return origin() if callable(origin) else origin

    def identity(self, key: str) -> str | None:
        """The wrapped source's identity of the fused weight plus the slice (None without one)."""
        identity = getattr(self.inner, "identity", None)
        if identity is None:
            return None
        s = parse_slice_key(key)
        if s is None:
            return identity(key)
        base = identity(s.key)
        return None if base is None else f"{base}|{s.name}"


def with_slices(source):
    """``source`` able to answer for slice keys (unchanged if it already can)."""
    return source if isinstance(source, SlicedWeights) else SlicedWeights(source)


def merge_slices(deltas: Mapping[str, Delta], full_shape: Callable[[str], tuple | None]) -> dict[str, Delta]:
    """Deltas with every fused weight's slices merged into one delta of the whole weight.

    For files: a kohya LoRA names whole modules (``lora_unet_double_blocks_0_img_attn_qkv``), and
    the stock loaders of ComfyUI, Forge and kohya read Flux and SD3 LoRAs in that form. The merge
    is exact and stays low-rank: slices along rows stack their ``up`` factors block-diagonally
    (each in its own rows, zeros elsewhere) over their stacked ``down`` factors, so the rank is the
    sum of the slices' ranks and rows no slice touches stay exactly zero. A delta of the whole
    weight, if there is one too, is added the same way.
    """
    out: dict[str, Delta] = {}
    parts: dict[str, list[tuple[WeightSlice | None, Delta]]] = {}
    for name, delta in deltas.items():
        s = parse_slice_key(name)
        if s is None and name not in parts:
            out[name] = delta
            continue
        key = name if s is None else s.key
        group = parts.setdefault(key, [])
        if key in out:
            group.append((None, out.pop(key)))
        group.append((s, delta))
    for key, group in parts.items():
        shape = full_shape(key)
        if shape is None:
            raise LoraxError("the fused weight of these slices is not in the target model", key=key)
        out[key] = _merged(key, tuple(shape), group)
    return out


def _merged(key: str, shape: tuple, group: list[tuple[WeightSlice | None, Delta]]) -> Delta:
    m = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    ups, downs = [], []
    for s, delta in group:
        f = delta.to_factored()
        dtype = torch.promote_types(f.up.dtype, torch.float32)
        up, down = f.up.to(dtype), f.down.to(dtype)
        r = up.shape[1]
        if s is None:
            ups.append(up)
            downs.append(down)
        elif s.dim == 0:
            full_up = up.new_zeros(m, r)
            full_up[s.start:s.stop] = up
            ups.append(full_up)
            downs.append(down)
        elif s.dim == 1 and len(shape) == 2:
            full_down = down.new_zeros(r, n)
            full_down[:, s.start:s.stop] = down
            ups.append(up)
            downs.append(full_down)
        else:
            raise LoraxError(f"cannot merge a slice along dim {s.dim} of a weight of shape {shape} into one "
                             "LoRA module", key=s.name)
    dtype = ups[0].dtype
    for t in ups + downs:
        dtype = torch.promote_types(dtype, t.dtype)
    return Delta(shape, up=torch.cat([u.to(dtype) for u in ups], dim=1),
                 down=torch.cat([d.to(dtype) for d in downs], dim=0))
