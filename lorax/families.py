"""What an adapter was made for, from its module names (and a few widths): the model families
ComfyUI detects and people train LoRAs for.

An adapter carries no model name, but its module names are the model's own (kohya/musubi
``lora_unet_blocks_0_self_attn_q``, diffusers/PEFT ``transformer.transformer_blocks.0.attn.to_q``,
ComfyUI/ai-toolkit ``diffusion_model.layers.0.attention.to_q``), and a down matrix's input width
is the model's hidden size. A pattern's separators match a dot or kohya's underscore, so one
pattern covers every layout. The patterns come from the module names of ComfyUI's classes
(``comfy/ldm``: flux, chroma, hunyuan_video, wan, qwen_image, lumina, lightricks, hidream,
mmdit) and its LoRA key maps (``comfy/lora.py``); LTX-2's audio modules from ComfyUI 0.33's
``comfy/ldm/lightricks/av_model.py`` (0.3.75 has no LTX-2 class).

:data:`FAMILIES` is tried in order, the first family with a module matching its ``marks`` wins;
its ``widths`` (hidden size → name) and then its ``variants`` (first match) make the name more
precise. Names that cannot be told apart from the names alone say so ("Flux.1 or Chroma").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", "_lora.down.weight", ".lora.down.weight")
_MODULE_SUFFIXES = _DOWN_SUFFIXES + (".lora_up.weight", ".lora_B.weight", "_lora.up.weight", ".lora.up.weight",
                                     ".alpha", ".dora_scale", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b",
                                     ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b",
                                     ".diff", ".diff_b", ".weight", ".bias")

#: Cross-attention context width (the input of attn2's key projection) of each UNet family.
_UNET_CONTEXT = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_SOME_UNET = "SD1.x, SD2.x or SDXL"

Names = Sequence[str]


def _pattern(pattern: str, raw: bool = False) -> re.Pattern:
    """``\\.`` in a family pattern matches a dot or an underscore (kohya's flattened names)."""
    return re.compile(pattern if raw else pattern.replace(r"\.", "[._]"))


def _any(pattern: str, raw: bool = False) -> Callable[[Names], bool]:
    rx = _pattern(pattern, raw)
    return lambda names: any(rx.search(n) for n in names)


def _none(pattern: str) -> Callable[[Names], bool]:
    found = _any(pattern)
    return lambda names: not found(names)


@dataclass(frozen=True)
class Family:
    """One architecture's signature in flattened module names (module docstring)."""

    name: str
    marks: str                                   # a module matching this names the family
    width_of: str | None = None                  # the module whose down matrix's input is the hidden size
    widths: Mapping[int, str] = field(default_factory=dict)
    variants: Sequence[tuple[Callable[[Names], bool], str]] = ()


_FLUX_MODULATION = (r"((img_mod|txt_mod|modulation)\.lin|norm1(_context)?\.linear"
                    r"|single_transformer_blocks\.\d+\.norm\.linear)$")
#: In order: the first family whose marks match decides (see the module docstring). In the
#: patterns ``\.`` stands for either separator (a dot, or kohya's underscore).
FAMILIES: tuple[Family, ...] = (
    Family(_SOME_UNET, r"(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)\.",
           width_of=r"attn2\.to_k$", widths=_UNET_CONTEXT),
    Family("SD3", r"(joint_blocks|context_block|x_block)\."),
    Family("HiDream", r"(double|single)_stream_blocks\.\d+\.block\."),
    Family("LTX-2", r"transformer_blocks\.\d+\.(audio_attn[12]|audio_to_video_attn|video_to_audio_attn|audio_ff)\."),
    Family("LTX-Video", r"transformer_blocks\.\d+\.attn[12]\.to_(q|k|v|out)"),
    Family("Qwen-Image", r"transformer_blocks\.\d+\.(img|txt)_(mlp|mod)\."),
    # ai-toolkit writes Z-Image's fused attention.qkv as diffusers' split to_q / to_k / to_v.
    Family("Z-Image or Lumina 2",
           r"(^|\.)(layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward|adaln_modulation)\.",
           width_of=r"layers\.\d+\.attention\.(qkv|to_q)$", widths={3840: "Z-Image", 2304: "Lumina 2"}),
    # ComfyUI's / musubi-tuner's names (self_attn.q, ffn.0) and diffusers' (attn1.to_q, ffn.net.0.proj).
    Family("Wan", r"(^|\.)blocks\.\d+\.((self|cross)_attn\.(q|k|v|o|k_img|v_img)|ffn\.[02]"
                  r"|attn[12]\.(to_(q|k|v)|to_out\.0|add_(k|v)_proj)|ffn\.net\.(0\.proj|2))$",
           variants=((_any(r"(cross_attn\.(k|v)_img|attn2\.add_(k|v)_proj)$"), "Wan I2V"),)),
    # Flux's block names, which HunyuanVideo and Flux.2 reuse and Chroma keeps without modulations.
    Family("Flux", r"(double_blocks|single_blocks|single_transformer_blocks)\.",
           width_of=r"(_attn\.(qkv|proj)|attn\.to_(q|k|v)|linear1)$", widths={6144: "Flux.2", 2048: "HunyuanVideo 1.5"},
           variants=((_any(r"distilled_guidance_layer"), "Chroma"),
                     # diffusion-pipe's names (img_attn_qkv after a dot), blocks past Flux.1's 19 + 38
                     (_any(r"(\.(img|txt)_attn_(qkv|proj)|\.(img|txt)_mlp\.fc[12]|_mod\.linear|modulation\.linear)$",
                           raw=True), "HunyuanVideo"),
                     (_any(r"double_blocks\.(19|[2-9]\d)\.|single_blocks\.(3[89]|[4-9]\d)\."), "HunyuanVideo"),
                     (_none(_FLUX_MODULATION), "Flux.1 or Chroma"))),
)


def module_name(key: str) -> str:
    """An adapter tensor's module name, lower-cased: ``transformer.blocks.0.attn1.to_q.lora_A.weight``
    → ``transformer.blocks.0.attn1.to_q``."""
    for suffix in _MODULE_SUFFIXES:
        if key.endswith(suffix):
            key = key[:-len(suffix)]
            break
    return key.lower()


def _width(tensors: Mapping[str, torch.Tensor], pattern: str) -> int | None:
    rx = _pattern(pattern)
    for key, t in tensors.items():
        if key.endswith(_DOWN_SUFFIXES) and t.dim() >= 2 and rx.search(module_name(key)):
            return int(t.shape[1])
    return None


def guess_architecture(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """What an adapter's module names say it was made for — ``"Flux"``, ``"Wan I2V"``,
    ``"Qwen-Image"``, ``"Z-Image"``, ``"SDXL"``… — or None when they name no family of
    :data:`FAMILIES` (tensors may be empty stand-ins when only names are known)."""
    names = sorted({module_name(k) for k in tensors})
    for family in FAMILIES:
        if not _any(family.marks)(names):
            continue
        width = _width(tensors, family.width_of) if family.width_of else None
        if width in family.widths:
            return family.widths[width]
        for applies, name in family.variants:
            if applies(names):
                return name
        return family.name
    return None


def family_names() -> list[str]:
    """Every name :func:`guess_architecture` can give (for docs and tests)."""
    out = []
    for f in FAMILIES:
        out += [f.name, *f.widths.values(), *(name for _, name in f.variants)]
    return list(dict.fromkeys(out))
