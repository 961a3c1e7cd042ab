"""Any weight the host hands out, as the dense matrix the model computes with — or a clear refusal.

Users load quantized models: fp8 checkpoints (plain or "scaled"), ComfyUI's quantized tensor
subclass (``comfy.quant_ops.QuantizedTensor``: comfy-kitchen layouts FP8, MXFP8, NVFP4, INT8 and
more), and GGUF files through the ComfyUI-GGUF pack (a tensor of packed bytes carrying
``tensor_type`` and ``tensor_shape``). Decomposing such a tensor's storage as if it were the
weight gives a silently wrong answer — packed bytes have another shape and meaning — so every
weight goes through :func:`dense_weight` before any arithmetic:

* plain float32 / float16 / bfloat16 and fp8 (e4m3fn, e5m2) tensors are handed on as they are
  stored (:func:`lorax.svd.weight_matrix` upcasts them a block at a time);
* a tensor subclass with its own ``dequantize()`` (ComfyUI's ``QuantizedTensor`` of any registered
  layout, in 0.3.75 and in the comfy-kitchen versions) is dequantized by that method — the
  layout's own arithmetic, never a cast of the subclass, which some layouts refuse and others
  answer in a rounded dtype;
* a GGUF tensor is dequantized with the ``gguf`` package (``gguf.quants.dequantize``, the
  reference port of ggml's kernels), a block of rows at a time, for every type that package
  can dequantize (Q4_0…Q8_0, the K-quants, the IQ types, BF16, TQ, MXFP4); LoRA patches
  ComfyUI-GGUF keeps on the tensor are not part of the base weight and are ignored;
* anything else — an unknown tensor subclass, integer or packed storage, a GGUF type the
  installed ``gguf`` cannot dequantize — raises :class:`UnreadableWeight`, one sentence naming
  the layer, the format seen and what would help.

The result is a plain ``torch.Tensor`` (never a Parameter, never requiring grad) of the weight's
logical shape on the device the weight is on; a plain weight's result is a detached view of it
(no copy), the same object for as long as the weight lives, so the digest memo of
:mod:`lorax.fingerprint` still recognises it. Only one layer is ever dequantized at a time:
callers read a layer, use it and drop it.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from .errors import LoraxError

#: Floating dtypes a stored weight may have and the SVD reads directly.
PLAIN_DTYPES: frozenset[torch.dtype] = frozenset(
    {torch.float32, torch.float16, torch.bfloat16, torch.float64}
    | {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
       if hasattr(torch, name)})

#: Elements of a GGUF tensor dequantized at once (bounds the ``gguf`` package's temporaries).
_GGUF_BLOCK_ELEMENTS = 1 << 22


class UnreadableWeight(LoraxError):
    """A weight whose storage format this pack cannot turn into the matrix the model uses."""


def is_gguf(t) -> bool:
    """A ComfyUI-GGUF tensor: packed storage carrying ``tensor_type`` and ``tensor_shape``."""
    return isinstance(t, torch.Tensor) and hasattr(t, "tensor_type") and hasattr(t, "tensor_shape")


def is_quantized_subclass(t) -> bool:
    """A tensor subclass that dequantizes itself (``QuantizedTensor`` of ComfyUI / comfy-kitchen)."""
    if not isinstance(t, torch.Tensor) or type(t) in (torch.Tensor, torch.nn.Parameter) or is_gguf(t):
        return False
    method = getattr(type(t), "dequantize", None)
    return callable(method) and method is not torch.Tensor.dequantize


def _layout_name(t) -> str:
    for attr in ("_layout_cls", "_layout_type", "layout_type"):
        value = getattr(t, attr, None)
        if value is not None:
            return value if isinstance(value, str) else getattr(value, "__name__", str(value))
    return type(t).__name__


def _gguf_type_name(t) -> str:
    qtype = getattr(t, "tensor_type", None)
    return "F32 (unquantized)" if qtype is None else getattr(qtype, "name", str(qtype))


def weight_format(t) -> str:
    """A short description of how ``t`` is stored, for reports and errors."""
    if is_gguf(t):
        return f"GGUF {_gguf_type_name(t)}"
    if is_quantized_subclass(t):
        return f"{type(t).__name__} ({_layout_name(t)})"
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"{type(t).__module__}.{type(t).__qualname__} ({t.dtype})"
    return str(t.dtype).replace("torch.", "")


def logical_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape of the weight the model computes with (a GGUF tensor's storage shape differs)."""
    if is_gguf(t):
        return tuple(int(d) for d in t.tensor_shape)
    return tuple(int(d) for d in t.shape)


# id(weight) → (weak reference to it, its detached view), for as long as the weight lives
# (module docstring). Keyed by id: tensors compare elementwise, so they cannot be dict keys.
_VIEWS: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _plain_view(t: torch.Tensor) -> torch.Tensor:
    if type(t) is torch.Tensor and not t.requires_grad:
        return t
    key = id(t)
    hit = _VIEWS.get(key)
    if hit is not None and hit[0]() is t:
        return hit[1]
    view = torch.Tensor.as_subclass(torch.Tensor.detach(t), torch.Tensor)
    try:
        ref = weakref.ref(t, lambda _ref, key=key: _VIEWS.pop(key, None))
    except TypeError:  # not weak-referenceable: a fresh view each time is still correct
        return view
    _VIEWS[key] = (ref, view)
    return view


def dense_weight(t: torch.Tensor, *, key: str | None = None, path=None) -> torch.Tensor:
    """``t`` as the plain floating tensor the model computes with (module docstring).

    ``key`` and ``path`` name the layer in errors. Raises :class:`UnreadableWeight` for a format
    that cannot be read, never returns packed storage.
    """
    if not isinstance(t, torch.Tensor):
        raise UnreadableWeight(f"expected a weight tensor, got {type(t).__name__}", key=key, path=path)
    if is_gguf(t):
        return _dequantize_gguf(t, key=key, path=path)
    if is_quantized_subclass(t):
        with torch.no_grad():
            try:
                out = t.dequantize()
            except Exception as e:  # the layout's own error, with the layer named
                raise UnreadableWeight(
                    f"the {weight_format(t)} weight could not be dequantized by its own layout "
                    f"({type(e).__name__}: {e}); update comfy-kitchen / ComfyUI, or load a "
                    "full-precision or fp8 copy of the model", key=key, path=path) from None
        out = torch.Tensor.as_subclass(out.detach(), torch.Tensor)
        return _checked(out, t, key=key, path=path, shape=tuple(t.shape))
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise UnreadableWeight(
            f"the weight is stored as {weight_format(t)}, a tensor type this pack does not know how to "
            "dequantize; load the model with ComfyUI's own loaders (full precision, fp8, or a "
            "comfy-kitchen quantization) or as GGUF through ComfyUI-GGUF", key=key, path=path)
    if t.dtype not in PLAIN_DTYPES:
        raise UnreadableWeight(
            f"the weight is stored as {t.dtype} of shape {tuple(t.shape)}: packed or integer storage, not "
            "the matrix itself; load the model through a loader that knows its quantization (ComfyUI's "
            "loaders for comfy-kitchen layouts, ComfyUI-GGUF for GGUF files)", key=key, path=path)
    return _plain_view(t)


def _checked(out: torch.Tensor, t, *, key, path, shape) -> torch.Tensor:
    if tuple(out.shape) != tuple(shape) or not out.dtype.is_floating_point:
        raise UnreadableWeight(
            f"dequantizing the {weight_format(t)} weight gave {out.dtype} of shape {tuple(out.shape)}, not a "
            f"floating matrix of shape {tuple(shape)}; its layout is not supported", key=key, path=path)
    return out


def _dequantize_gguf(t: torch.Tensor, *, key, path) -> torch.Tensor:
    """A GGUF tensor's float32 matrix, dequantized by the ``gguf`` package a block of rows at a time."""
    shape = logical_shape(t)
    raw = torch.Tensor.as_subclass(t.detach(), torch.Tensor)
    qtype = getattr(t, "tensor_type", None)
    name = _gguf_type_name(t)
    try:
        import gguf
    except ImportError:
        raise UnreadableWeight(
            f"the weight is GGUF {name}; reading GGUF models needs the `gguf` package "
            "(pip install gguf, which ComfyUI-GGUF also requires)", key=key, path=path) from None
    if qtype is None or qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        if raw.dtype not in PLAIN_DTYPES or raw.numel() != int(np.prod(shape)):
            raise UnreadableWeight(f"the GGUF {name} weight holds {raw.dtype} of shape {tuple(raw.shape)}, "
                                   f"not a matrix of shape {shape}", key=key, path=path)
        return _plain_view(raw.reshape(shape)) if raw.requires_grad else raw.reshape(shape)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % block_size:
        raise UnreadableWeight(f"the GGUF {name} weight's last dimension ({shape[-1] if shape else 0}) is not a "
                               f"multiple of the type's block size {block_size}", key=key, path=path)
    rows = int(np.prod(shape[:-1]))
    row_bytes = shape[-1] // block_size * type_size
    data = raw.reshape(-1).view(torch.uint8) if raw.dtype != torch.uint8 else raw.reshape(-1)
    if data.numel() != rows * row_bytes:
        raise UnreadableWeight(f"the GGUF {name} weight holds {data.numel()} bytes; a {shape} weight of that type "
                               f"needs {rows * row_bytes}", key=key, path=path)
    data = data.cpu().reshape(rows, row_bytes)
    out = torch.empty(rows, shape[-1], dtype=torch.float32)
    step = max(1, _GGUF_BLOCK_ELEMENTS // shape[-1])
    try:
        for start in range(0, rows, step):
            block = gguf.quants.dequantize(data[start:start + step].numpy(), qtype)
            out[start:start + step] = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    except NotImplementedError:
        raise UnreadableWeight(
            f"the weight is GGUF {name}, which the installed gguf package ({getattr(gguf, '__version__', '?')}) "
            "cannot dequantize; update gguf, or use a GGUF file of another quantization type "
            "(Q8_0, Q5_K, Q4_K…)", key=key, path=path) from None
    return out.reshape(shape).to(t.device)
