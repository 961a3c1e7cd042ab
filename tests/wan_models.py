"""Mini Wan 2.1 / 2.2 A14B-shaped models that ComfyUI detects as Wan, for the Wan example
workflows and the two-expert transfer (no ComfyUI import at module level).

Key names and shapes come from ComfyUI's own classes, instantiated on the meta device:
``comfy.ldm.wan.model.WanModel`` for the diffusion model and ``comfy.ldm.wan.vae.WanVAE`` for the
Wan 2.1 VAE (which Wan 2.2 A14B uses too). ComfyUI's detection (``comfy/model_detection.py``,
``head.modulation`` present) reads ``dim``, ``ffn_dim``, the number of blocks and the in/out
channels from the state dict and fixes 128 features per head and ``text_dim`` 4096, so the mini
XX With out_dim 16 it
is detected as ``WAN21_T2V``: the class ComfyUI loads Wan 2.1 T2V 14B *and* each of the two Wan
2.2 A14B experts as (ComfyUI's ``WAN22_T2V`` is the 5B model, out_dim 48).

* **Source** (stands for Wan 2.1 T2V 14B): every matrix random with a power-law spectrum
  (:func:`host.power_law_matrix`).
* **Experts** (stand for Wan 2.2 A14B high-noise and low-noise): two different 5 % fine-tunes of
  the source (:func:`host.fine_tune`, seeds 1 and 2), close relatives as the real experts are of
  Wan 2.1 and of each other.
* **VAE**: the Wan 2.1 VAE at ``dim`` 8 (ComfyUI reads ``dim`` from ``decoder.head.0.gamma``);
  convolutions N(0, 1/fan_in), norms 1, biases 0.

The umT5-XXL text encoder cannot be narrowed (its configuration is a fixed JSON file, 5.7 B
parameters), so graphs in the tests use the zero conditioning of ``tests/host_nodes.py`` with
:data:`TEXT_DIM` features instead.
"""

from __future__ import annotations

import math
from typing import Any

import host

#: The text features Wan's cross-attention reads (umT5-XXL's width; fixed by ComfyUI's detection).
TEXT_DIM = 4096
WAN_MINI_CONFIG = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=384, ffn_dim=768,
                       freq_dim=256, text_dim=TEXT_DIM, out_dim=16, num_heads=3, num_layers=2, window_size=(-1, -1),
                       qk_norm=True, cross_attn_norm=True, eps=1e-6)
WAN_VAE_MINI_CONFIG = dict(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
#: The linear layers of one Wan block a LoRA for Wan usually adapts (musubi-tuner, diffusion-pipe).
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")

_LAYOUTS: dict[str, dict[str, tuple[int, ...]]] = {}


def _meta_layout(name: str, build) -> dict[str, tuple[int, ...]]:
    if name not in _LAYOUTS:
        early = host.prepare_early()
        if early["tree"] is None:
            raise RuntimeError(f"No ComfyUI tree found ({early['how']}): {host.SETUP_HINT}.")
        import torch

        with torch.device("meta"):
            model = build()
        _LAYOUTS[name] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _LAYOUTS[name]


def wan_layout(**overrides) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a Wan 2.1 diffusion model from ComfyUI's ``WanModel`` (mini configuration)."""
    cfg = {**WAN_MINI_CONFIG, **overrides}

    def build():
        import comfy.ops
        from comfy.ldm.wan.model import WanModel

        return WanModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)

    return _meta_layout(f"wan|{sorted((k, str(v)) for k, v in cfg.items())}", build)


def wan_vae_layout(**overrides) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of ComfyUI's Wan 2.1 VAE (``comfy.ldm.wan.vae.WanVAE``, mini configuration)."""
    cfg = {**WAN_VAE_MINI_CONFIG, **overrides}

    def build():
        from comfy.ldm.wan.vae import WanVAE

        return WanVAE(**cfg)

    return _meta_layout(f"wan-vae|{sorted((k, str(v)) for k, v in cfg.items())}", build)


def build_mini_wan(seed: int = 0, **overrides) -> dict[str, Any]:
    """A random Wan 2.1 T2V diffusion model with ComfyUI's key names (float32; module docstring)."""
    import torch

    out: dict[str, Any] = {}
    for key, shape in wan_layout(**overrides).items():
        if len(shape) >= 2:
            out[key] = host.power_law_matrix(shape[0], math.prod(shape[1:]), seed=seed, key=key).reshape(shape)
        elif key.endswith(".weight"):  # the RMS and layer norms' scales
            out[key] = 1.0 + 0.01 * torch.randn(shape, generator=host.seeded_generator(seed, key))
        else:
            out[key] = torch.randn(shape, generator=host.seeded_generator(seed, key)) * 0.01
    return out


def build_mini_wan_experts(source: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(high_noise, low_noise)``: two different 5 % fine-tunes of ``source`` (module docstring)."""
    return host.fine_tune(source, seed=1, strength=0.05), host.fine_tune(source, seed=2, strength=0.05)


def build_mini_wan_vae(seed: int = 0, **overrides) -> dict[str, Any]:
    """A Wan 2.1 VAE state dict at the mini width (module docstring)."""
    import torch

    out: dict[str, Any] = {}
    for key, shape in wan_vae_layout(**overrides).items():
        if key.endswith("gamma"):
            out[key] = torch.ones(shape)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=host.seeded_generator(seed, key)) / math.sqrt(fan_in)
        else:
            out[key] = torch.zeros(shape)
    return out


def wan_lora(layout: dict[str, tuple[int, ...]], rng, *, blocks=(0, 1), rank: int = 4, std: float = 0.05,
             modules=BLOCK_LINEARS) -> dict[str, Any]:
    """A LoRA for Wan in the layout ComfyUI's Wan LoRAs use (``diffusion_model.blocks.0.self_attn.q.lora_A.weight``
    / ``lora_B.weight``, no alpha) on ``modules`` of ``blocks``."""
    import torch

    out = {}
    for b in blocks:
        for m in modules:
            rows, cols = layout[f"blocks.{b}.{m}.weight"]
            name = f"diffusion_model.blocks.{b}.{m}"
            out[f"{name}.lora_B.weight"] = torch.from_numpy(rng.standard_normal((rows, rank)) * std).float()
            out[f"{name}.lora_A.weight"] = torch.from_numpy(rng.standard_normal((rank, cols)) * std).float()
    return out
