"""Folders of LoRA files for the library scan and batch tests and for bench/batch.py.

Built on the synthetic mini SD1.5 of tests/host.py (no ComfyUI import): LoRAs of that base on
various layer sets, a partly fitting one, one made for another architecture, a truncated file,
a LoRA-X adapter (sigmas and source sketches) and LyCORIS LoHa / LoKr files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

import host
from lorax.fingerprint import weight_sketch
from lorax.lorax_adapter import LoraxAdapter, save_lorax

ATTN1 = [f"input_blocks.1.1.transformer_blocks.0.attn1.{p}.weight" for p in ("to_q", "to_k", "to_v", "to_out.0")]
ATTN2 = [f"input_blocks.1.1.transformer_blocks.0.attn2.{p}.weight" for p in ("to_q", "to_k", "to_v", "to_out.0")]
DEEP = [f"output_blocks.2.1.transformer_blocks.0.{p}.weight" for p in ("attn1.to_q", "attn1.to_v", "ff.net.2")]
#: Layer sets a batch of generated LoRAs cycles through (they overlap, as real LoRAs of one base do).
LAYER_SETS = [ATTN1 + ATTN2, ATTN1 + DEEP, ATTN2 + DEEP, ATTN1[:2] + ATTN2[2:] + DEEP[1:]]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kohya_lora(sd: Mapping[str, torch.Tensor], keys, *, rank: int = 4, seed: int = 0, alpha: float = 2.0):
    g = _g(seed)
    factors = {k: (torch.randn(sd[k].shape[0], rank, generator=g) * 0.05,
                   torch.randn(rank, sd[k][0].numel(), generator=g).reshape(rank, *sd[k].shape[1:]) * 0.05)
               for k in keys}
    return host.make_kohya_lora(factors, alpha=alpha)


def loha(sd, keys, *, rank: int = 4, seed: int = 0):
    g, out = _g(seed), {}
    for key in keys:
        w, name = sd[key], host.kohya_lora_prefix(key)
        out.update({f"{name}.hada_w1_a": torch.randn(w.shape[0], rank, generator=g) * 0.1,
                    f"{name}.hada_w1_b": torch.randn(rank, w.shape[1], generator=g) * 0.1,
                    f"{name}.hada_w2_a": torch.randn(w.shape[0], rank, generator=g) * 0.1,
                    f"{name}.hada_w2_b": torch.randn(rank, w.shape[1], generator=g) * 0.1,
                    f"{name}.alpha": torch.tensor(float(rank))})
    return out


def lokr(sd, keys, *, seed: int = 0):
    g, out = _g(seed), {}
    for key in keys:
        w, name = sd[key], host.kohya_lora_prefix(key)
        out.update({f"{name}.lokr_w1": torch.randn(4, 4, generator=g) * 0.1,
                    f"{name}.lokr_w2": torch.randn(w.shape[0] // 4, w.shape[1] // 4, generator=g) * 0.1})
    return out


def flux_lora(*, rank: int = 4, seed: int = 0):
    """A LoRA with Flux module names (diffusers layout): matches no layer of a UNet."""
    g, out = _g(seed), {}
    for block in range(2):
        for p in ("to_q", "to_k", "to_v"):
            name = f"transformer.transformer_blocks.{block}.attn.{p}"
            out[f"{name}.lora_A.weight"] = torch.randn(rank, 3072, generator=g) * 0.01
            out[f"{name}.lora_B.weight"] = torch.randn(3072, rank, generator=g) * 0.01
    out["transformer.single_transformer_blocks.0.proj_out.lora_A.weight"] = torch.randn(rank, 15360, generator=g)
    out["transformer.single_transformer_blocks.0.proj_out.lora_B.weight"] = torch.randn(3072, rank, generator=g)
    return out


def lorax_adapter(sd, keys, *, r: int = 8, seed: int = 0) -> LoraxAdapter:
    g = _g(seed)
    sigmas = {host.kohya_lora_prefix(k): torch.randn(r, generator=g) * 0.05 for k in keys}
    sketches = {host.kohya_lora_prefix(k): weight_sketch(sd[k]) for k in keys}
    return LoraxAdapter(sigmas=sigmas, sketches=sketches)


def write_mixed_library(folder: Path, source_sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The acceptance folder of issue 14; returns {file name: what it is}."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(kohya_lora(source_sd, ATTN1 + ATTN2, seed=1), str(folder / "style_a.safetensors"))
    (folder / "sub").mkdir(exist_ok=True)
    save_file(kohya_lora(source_sd, ATTN1 + DEEP, seed=2, alpha=4.0), str(folder / "sub" / "style_b.safetensors"))
    partly = kohya_lora(source_sd, ATTN2, seed=3)
    # Modules of deeper blocks this two-level model does not have (an SD1.5 LoRA of a bigger UNet).
    for missing in ("input_blocks.7.1.transformer_blocks.0.attn1.to_q.weight",
                    "output_blocks.9.1.transformer_blocks.0.attn1.to_k.weight"):
        p = host.kohya_lora_prefix(missing)
        partly[f"{p}.lora_up.weight"] = torch.zeros(640, 4)
        partly[f"{p}.lora_down.weight"] = torch.zeros(4, 640)
        partly[f"{p}.alpha"] = torch.tensor(4.0)
    save_file(partly, str(folder / "partly.safetensors"))
    save_file(flux_lora(seed=4), str(folder / "flux_style.safetensors"))
    whole = (folder / "style_a.safetensors").read_bytes()
    (folder / "damaged.safetensors").write_bytes(whole[: len(whole) // 2])
    save_lorax(folder / "lorax_adapter.safetensors", lorax_adapter(source_sd, ATTN1 + DEEP[:2], seed=5))
    save_file(loha(source_sd, ATTN1, seed=6), str(folder / "loha.safetensors"))
    save_file(lokr(source_sd, ATTN2, seed=7), str(folder / "lokr.safetensors"))
    return {"style_a.safetensors": "LoRA of this base", "sub/style_b.safetensors": "LoRA of this base",
            "partly.safetensors": "LoRA with modules of a deeper UNet",
            "flux_style.safetensors": "Flux LoRA", "damaged.safetensors": "truncated",
            "lorax_adapter.safetensors": "LoRA-X adapter", "loha.safetensors": "LyCORIS LoHa",
            "lokr.safetensors": "LyCORIS LoKr"}


def transformer_linears(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Every 2-D weight inside the transformer blocks, plus proj_in/proj_out: what a LoRA
    trainer's usual UNet targets cover."""
    return [k for k, v in sd.items() if v.dim() >= 2 and k.endswith(".weight")
            and (".transformer_blocks." in k or ".proj_in." in k or ".proj_out." in k)]


def write_lora_batch(folder: Path, source_sd: Mapping[str, torch.Tensor], n: int, *, rank: int = 8,
                     every_layer: bool = False) -> list[Path]:
    """``n`` ordinary LoRAs of the base for the benchmark: on the overlapping :data:`LAYER_SETS`
    in turn, or (``every_layer``) each on all of :func:`transformer_linears`."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"lora_{i:03d}.safetensors"
        keys = transformer_linears(source_sd) if every_layer else LAYER_SETS[i % len(LAYER_SETS)]
        save_file(kohya_lora(source_sd, keys, rank=rank, seed=100 + i), str(path))
        out.append(path)
    return out
