"""Large synthetic UNets that are cheap to build, for layer maps and transfers across models:
SDXL, SSD-1B-style distillations of it (transformer blocks removed, the kept ones perturbed
copies of their teacher's), and SD1.5 layouts of any depth — all accepted by ComfyUI's own
model detection.

ComfyUI tells SDXL, SSD-1B and Segmind Vega apart by the transformer depth of the *input*
blocks alone (``[0, 0, 2, 2, 10, 10]`` / ``[0, 0, 2, 2, 4, 4]`` / ``[0, 0, 1, 1, 2, 2]``, with
``model_channels`` 320, ``context_dim`` 2048, ``adm_in_channels`` 2816, linear ``proj_in``), so
the middle and output blocks here are one transformer block deep to keep the models small; the
input side has every block the real models have. Still ~1.3 B parameters for SDXL, so weights
are stored in float8 (1 byte each) and only the transformers' attention projections carry
content — a power-law spectrum with an exactly known SVD, drawn cheaply (below); feed-forward
layers, convolutions, norms and embeddings are zeros, which detection and the LoRA machinery do
not mind. These models are for
layer maps and transfers, not for sampling.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Callable, Mapping, Sequence

import torch

from host import unet_layout

SDXL_DEPTH = (0, 2, 10)
SSD1B_DEPTH = (0, 2, 4)
VEGA_DEPTH = (0, 1, 2)
#: Which layers carry content by default: attention projections (the LoRA targets these tests
#: use). SDXL's feed-forward layers stay zero: their tall shapes (10240 × 1280) would cost most
#: of the build. ``TRANSFORMER_LINEARS`` adds feed-forward layers and proj_in/out.
ATTENTION = re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.to_(q|k|v|out\.0)\.weight$")
TRANSFORMER_LINEARS = re.compile(r"(\.transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))"
                                 r"|\.proj_(in|out))\.weight$")


def _gen(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(repr(parts).encode())) % (2**63 - 1))


class PowerLawBank:
    """Power-law matrices ``σ_i ∝ i^-decay`` at the Frobenius norm of an N(0, 1/cols) init.

    Per shape one random orthonormal pair ``U₀, V₀`` is drawn once; each key gets
    ``D₁ P U₀ diag(σ) V₀ᵀ Qᵀ D₂`` (row and column permutations, sign flips): a different matrix
    with the same, exactly known spectrum, at the cost of an index and a sign flip.
    """

    def __init__(self, seed: int, decay: float = 0.8):
        self.seed, self.decay = seed, decay
        self._bases: dict[tuple[int, int], torch.Tensor] = {}

    def _base(self, rows: int, cols: int) -> torch.Tensor:
        if (rows, cols) not in self._bases:
            g = _gen(self.seed, "basis", rows, cols)
            r = min(rows, cols)
            u = torch.linalg.qr(torch.randn(rows, r, generator=g)).Q
            v = torch.linalg.qr(torch.randn(cols, r, generator=g)).Q
            s = torch.arange(1, r + 1, dtype=torch.float64).pow(-self.decay)
            s = (s * (math.sqrt(rows) / s.norm())).to(torch.float32)
            self._bases[(rows, cols)] = (u * s) @ v.T
        return self._bases[(rows, cols)]

    def matrix(self, key: str, rows: int, cols: int) -> torch.Tensor:
        g = _gen(self.seed, "layer", key)
        w = self._base(rows, cols).index_select(0, torch.randperm(rows, generator=g))
        w = w.index_select(1, torch.randperm(cols, generator=g))
        d1 = torch.randint(0, 2, (rows, 1), generator=g).float() * 2 - 1
        d2 = torch.randint(0, 2, (1, cols), generator=g).float() * 2 - 1
        return w * d1 * d2


def sdxl_layout(transformer_depth: Sequence[int]) -> list[tuple[str, tuple[int, ...], str]]:
    return unet_layout(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=transformer_depth,
                       transformer_depth_output=[1 if d else 0 for d in transformer_depth], transformer_depth_middle=1,
                       context_dim=2048, in_channels=4, out_channels=4, use_linear_in_transformer=True,
                       adm_in_channels=2816)


def build_unet(layout: Sequence[tuple[str, tuple[int, ...], str]], *, bank: PowerLawBank,
               dtype: torch.dtype = torch.float8_e4m3fn, content: re.Pattern = ATTENTION) -> dict[str, torch.Tensor]:
    """A state dict (ComfyUI's internal keys) for a ``host.unet_layout``: the weights ``content``
    matches from ``bank`` (1×1 convs as their matrix), everything else zeros."""
    sd = {}
    for key, shape, kind in layout:
        if kind in ("linear", "conv") and content.search(key):
            sd[key] = bank.matrix(key, shape[0], math.prod(shape[1:])).reshape(shape).to(dtype)
        else:
            sd[key] = torch.zeros(shape, dtype=dtype)
    return sd


def build_sdxl_family_unet(transformer_depth: Sequence[int] = SDXL_DEPTH, *, seed: int = 0,
                           dtype: torch.dtype = torch.float8_e4m3fn,
                           bank: PowerLawBank | None = None) -> dict[str, torch.Tensor]:
    """An SDXL-family UNet (``SDXL_DEPTH``, ``SSD1B_DEPTH``, ``VEGA_DEPTH``…)."""
    return build_unet(sdxl_layout(transformer_depth), bank=bank or PowerLawBank(seed), dtype=dtype)


def transformer_block_key(transformer: str, block: int, layer: str) -> str:
    """``input_blocks.7.1`` + 3 + ``attn1.to_q`` → ``input_blocks.7.1.transformer_blocks.3.attn1.to_q.weight``."""
    return f"{transformer}.transformer_blocks.{block}.{layer}.weight"


def derive(teacher: Mapping[str, torch.Tensor], layout: Sequence[tuple[str, tuple[int, ...], str]],
           copied_from: Callable[[str], str | None], *, seed: int, strength: float = 0.1,
           dtype: torch.dtype = torch.float8_e4m3fn, content: re.Pattern = ATTENTION) -> dict[str, torch.Tensor]:
    """A student model of ``layout`` made from ``teacher``, as distilled models are.

    ``copied_from(key)`` names the teacher weight a student weight was distilled from (``None``:
    the teacher's weight of the same name, unchanged). Distilled ``content`` weights get
    ``W + D`` with ``‖D‖_F = strength·‖W‖_F`` (dense Gaussian: a distillation's drift). Weights
    the teacher lacks in that shape (resblocks whose skip widths changed) are zeros.
    """
    student = {}
    for key, shape, _ in layout:
        source_key = copied_from(key)
        w = teacher.get(source_key or key)
        if w is None or tuple(w.shape) != tuple(shape):
            student[key] = torch.zeros(shape, dtype=dtype)
            continue
        if source_key is not None and content.search(key):
            w32 = w.float()
            noise = torch.randn(w32.shape, generator=_gen(seed, "drift", key))
            w = w32 + noise * (strength * w32.norm() / noise.norm())
        student[key] = w.to(dtype)
    return student


def distill(teacher: Mapping[str, torch.Tensor], kept: Mapping[str, Sequence[int]], transformer_depth: Sequence[int],
            *, seed: int, strength: float = 0.1, dtype: torch.dtype = torch.float8_e4m3fn) -> dict[str, torch.Tensor]:
    """An SDXL-family student with fewer transformer blocks, as SSD-1B is made from SDXL.

    ``kept`` maps a transformer (``input_blocks.7.1``) to the teacher's block indices its blocks
    are copied from, in order (ComfyUI numbers them 0, 1, … again); see :func:`derive`.
    """
    def copied_from(key: str) -> str | None:
        for transformer, blocks in kept.items():
            m = re.fullmatch(re.escape(transformer) + r"\.transformer_blocks\.(\d+)\.(.+)", key)
            if m:
                return f"{transformer}.transformer_blocks.{blocks[int(m.group(1))]}.{m.group(2)}"
        return None

    return derive(teacher, sdxl_layout(transformer_depth), copied_from, seed=seed, strength=strength, dtype=dtype)
