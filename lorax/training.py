"""Training LoRA-X adapters: only the top-r singular values of each adapted weight move.

For every adapted weight ``W_s = U_s Σ_s V_sᵀ`` (viewed as ``out × in·kh·kw``) the trained model
uses::

    W = W_s + U_s,r diag(Δσ) V_s,rᵀ

with ``U_s,r`` and ``V_s,r`` frozen (the top-r singular vectors from the SVD engine and its cache)
and ``Δσ`` — r numbers per layer, initialised at zero — the only trainable tensor. A trained
adapter is therefore exactly a :class:`~lorax.lorax_adapter.LoraxAdapter` on its source, and
:func:`collect_adapter` turns the trained layers into one (with the source sketches that check
it is applied to the right model).

:class:`SigmaAdapter` is a *weight wrapper*: a module called with the (cast) base weight on every
forward that returns the adapted weight. It duck-types ComfyUI's ``WeightAdapterTrainBase``
(``__call__(w)``, ``passive_memory_usage()``, ``move_to(device)``), so a ModelPatcher can carry
it through ``add_weight_wrapper(key, adapter)`` exactly like the stock trainer's LoRA modules;
the node layer subclasses it together with the host's base class (this module imports no
ComfyUI). Pure torch.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from .engine import SVDEngine
from .errors import LoraxError
from .fingerprint import weight_sketch
from .lorax_adapter import LoraxAdapter
from .svd import SVDFactors, max_rank

#: Layer families a training run can adapt (cumulative), as shown in the node.
FAMILIES: tuple[str, ...] = ("attention (q, k, v, out)", "attention + feed-forward",
                             "attention + feed-forward + proj/conv")

# Model keys ("diffusion_model.….weight") of each family. Attention: SD1.x/SDXL
# (attn1/attn2 to_q/to_k/to_v/to_out.0), SD3/Flux fused (attn.qkv/attn.proj, img_attn/txt_attn),
# CLIP-style (self_attn q_proj/k_proj/v_proj/out_proj). Feed-forward: SD ff.net.0.proj/ff.net.2,
# SD3/Flux mlp, Flux single-block linear1/linear2. proj/conv: transformer proj_in/proj_out and
# every convolution kernel (ResNet blocks, up/down samplers, input/output convs).
_ATTENTION = re.compile(r"(attn\d*|attention|self_attn|img_attn|txt_attn)\."
                        r"(to_q|to_k|to_v|to_out\.0|q_proj|k_proj|v_proj|out_proj|qkv|proj)\.weight$")
_FEED_FORWARD = re.compile(r"(\.ff\.net\.(0\.proj|2)|\.ff_context\.net\.(0\.proj|2)|_mlp\.[02]"
                           r"|\.mlp\.(0|2|fc1|fc2)|\.linear[12])\.weight$")
_PROJ = re.compile(r"\.(proj_in|proj_out)\.weight$")


def family_index(family: str) -> int:
    if family not in FAMILIES:
        raise LoraxError(f"unknown layer family {family!r}; expected one of: {', '.join(FAMILIES)}")
    return FAMILIES.index(family)


def in_family(key: str, shape: Sequence[int], family: str) -> bool:
    """Whether the weight ``key`` of ``shape`` belongs to ``family`` (families are cumulative)."""
    level = family_index(family)
    if len(shape) < 2 or not key.endswith(".weight"):
        return False
    if _ATTENTION.search(key):
        return True
    if level >= 1 and _FEED_FORWARD.search(key):
        return True
    return level >= 2 and (_PROJ.search(key) is not None or len(shape) >= 3)


def select_layers(shapes: Mapping[str, Sequence[int]], family: str) -> list[str]:
    """The keys of ``shapes`` (key → weight shape) that ``family`` adapts, in the given order."""
    return [k for k, s in shapes.items() if s is not None and in_family(k, s, family)]


@contextlib.contextmanager
def _no_autocast(device: torch.device):
    """Autocast off for the Δσ arithmetic (kept in float32 even in a bf16 training run)."""
    if device.type in ("cuda", "cpu", "xpu", "mps", "hpu"):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


class SigmaAdapter(torch.nn.Module):
    """``w ↦ w + U diag(σ) Vᵀ`` with frozen ``U`` (``m × r``), ``V`` (``n × r``) and trainable ``σ``.

    ``U`` and ``V`` are float32 buffers (saved with the module's state, moved by ``move_to``, never
    given to an optimizer); ``sigma`` (``r`` numbers, float32, zero unless ``sigma`` is given) is
    the only :class:`torch.nn.Parameter`. The delta is computed in float32 with autocast off and
    added to the weight in float32; the result has ``w``'s shape and dtype (conv kernels are
    flattened as ``out × in·kh·kw``, the way the SVD engine reads them).
    """

    def __init__(self, U: torch.Tensor, V: torch.Tensor, sigma: torch.Tensor | None = None):
        super().__init__()
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[1]:
            raise ValueError(f"U {tuple(U.shape)} and V {tuple(V.shape)} must be m×r and n×r")
        r = int(U.shape[1])
        self.register_buffer("U", U.detach().to(torch.float32).clone().contiguous())
        self.register_buffer("V", V.detach().to(torch.float32).clone().contiguous())
        init = torch.zeros(r, dtype=torch.float32, device=self.U.device) if sigma is None else \
            sigma.detach().to(device=self.U.device, dtype=torch.float32).reshape(-1).clone()
        if init.numel() != r:
            raise ValueError(f"sigma has {init.numel()} values, the basis has rank {r}")
        self.sigma = torch.nn.Parameter(init)

    @classmethod
    def from_factors(cls, factors: SVDFactors, sigma: torch.Tensor | None = None) -> "SigmaAdapter":
        return cls(factors.U, factors.V, sigma)

    @property
    def rank(self) -> int:
        return int(self.sigma.numel())

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[0])

    def delta(self) -> torch.Tensor:
        """``U diag(σ) Vᵀ`` (``m × n``, float32), differentiable in ``σ``."""
        with _no_autocast(self.U.device):
            return (self.U * self.sigma) @ self.V.mT

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        m, n = self.matrix_shape
        if w.shape[0] != m or w[0].numel() != n:
            raise ValueError(f"this adapter is for a {m}×{n} weight, got shape {tuple(w.shape)}")
        with _no_autocast(w.device):
            d = self.delta().to(w.device)
            out = w.to(torch.float32) + d.reshape(w.shape)
        return out.to(w.dtype)

    def passive_memory_usage(self) -> int:
        """Bytes held by the adapter (U, V and σ)."""
        tensors = list(self.parameters()) + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def move_to(self, device) -> int:
        self.to(device=device)
        return self.passive_memory_usage()

    def extra_repr(self) -> str:
        m, n = self.matrix_shape
        return f"{m}×{n}, r={self.rank}"


@dataclass
class TrainableLayer:
    """One adapted weight: its model key, its module name in the LoRA-X file, and its adapter."""

    key: str
    module: str
    shape: tuple[int, ...]
    adapter: SigmaAdapter
    sketch: torch.Tensor          # weight_sketch of the source weight

    @property
    def rank(self) -> int:
        return self.adapter.rank


def prepare_layers(weights: Mapping[str, torch.Tensor], modules: Mapping[str, str], rank: int,
                   engine: SVDEngine, adapter_class: type[SigmaAdapter] = SigmaAdapter) -> list[TrainableLayer]:
    """A zero-initialised :class:`SigmaAdapter` for each source weight (model key → tensor).

    ``r = min(rank, rank of the layer)``; ``modules`` names each key in the file (kohya-style).
    The factors come from ``engine`` (memo and disk cache), in batches of one shape.
    """
    if not isinstance(rank, int) or rank < 1:
        raise LoraxError(f"rank must be a positive integer, got {rank!r}")
    keys = list(weights)
    missing = [k for k in keys if k not in modules]
    if missing:
        raise LoraxError("no module name for this layer (not in the model's LoRA key map)", key=missing[0])
    ks = [min(rank, max_rank(weights[k].shape)) for k in keys]
    factors = engine.factors_many([(weights[k], r) for k, r in zip(keys, ks)])
    layers = []
    for key, f in zip(keys, factors):
        w = weights[key]
        layers.append(TrainableLayer(key=key, module=modules[key], shape=tuple(w.shape),
                                     adapter=adapter_class.from_factors(f), sketch=weight_sketch(w)))
    return layers


def trainable_parameters(layers: Iterable[TrainableLayer]) -> list[torch.nn.Parameter]:
    return [layer.adapter.sigma for layer in layers]


def parameter_count(layers: Iterable[TrainableLayer]) -> int:
    """Σ r over the layers: the number of trained numbers."""
    return sum(layer.rank for layer in layers)


def collect_adapter(layers: Iterable[TrainableLayer], metadata: Mapping[str, str] | None = None) -> LoraxAdapter:
    """The trained ``Δσ`` of every layer as a :class:`LoraxAdapter` (CPU float32 copies, with sketches)."""
    sigmas: dict[str, torch.Tensor] = {}
    sketches: dict[str, torch.Tensor] = {}
    for layer in layers:
        sigma = layer.adapter.sigma.detach().to("cpu", torch.float32).clone()
        if not bool(torch.isfinite(sigma).all()):
            raise LoraxError("training diverged: Δσ holds NaN or inf values; lower the learning rate",
                             key=layer.module)
        sigmas[layer.module] = sigma
        sketches[layer.module] = layer.sketch.detach().to("cpu", torch.float64).clone()
    if not sigmas:
        raise LoraxError("no layer was trained")
    return LoraxAdapter(sigmas=sigmas, sketches=sketches, metadata=dict(metadata or {}))
