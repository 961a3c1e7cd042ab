"""Synthetic models for the tests and benchmarks: a mini SD1.5-layout UNet, full SD1.5 checkpoints, fine-tunes.

Needs no ComfyUI import (except :func:`sd15_te_vae_layout`, which reads the shapes from the host's
own model classes once per process).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Mapping, Sequence

from host_boot import COMFYUI_VERSION, SETUP_HINT, prepare_early

# --------------------------------------------------------------------------------------
# Synthetic models (no ComfyUI import needed).
# --------------------------------------------------------------------------------------


def seeded_generator(seed: int, key: str):
    import torch

    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1))
    return g


def power_law_matrix(rows: int, cols: int, *, seed: int = 0, key: str = "", decay: float = 0.8,
                     gain: float = 1.0):
    """``U diag(s) V^T`` with random orthonormal U, V and ``s_i ∝ i^-decay``, scaled so
    ``||W||_F = gain * sqrt(rows)`` (the Frobenius norm of iid N(0, gain²/cols) entries).
    float32, deterministic in (seed, key)."""
    import torch

    g = seeded_generator(seed, key)
    r = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=g))
    s = torch.arange(1, r + 1, dtype=torch.float64).pow(-decay)
    s = (s * (gain * math.sqrt(rows) / s.norm())).to(torch.float32)
    return (u * s) @ v.T


def unet_layout(*, model_channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                transformer_depth: Sequence[int], context_dim: int, in_channels: int, out_channels: int,
                transformer_depth_middle: int | None = None, transformer_depth_output: Sequence[int] | None = None,
                use_linear_in_transformer: bool = False,
                adm_in_channels: int | None = None) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) for a UNet of ComfyUI/ldm ``openaimodel.UNetModel`` with
    ``use_spatial_transformer``, in order. kind: 'linear', 'conv', 'norm_w', 'norm_b', 'bias'.

    Defaults give SD1.x (conv proj_in/proj_out, no label embedding, the output blocks of a level
    as deep as its input blocks, a middle transformer as deep as the last level, at least 1).
    SDXL-family models: ``use_linear_in_transformer=True``, ``adm_in_channels=2816``, and per level
    ``transformer_depth`` / ``transformer_depth_output`` (ComfyUI's detection reads the input
    side; the middle and output depths are free).
    """
    mc = model_channels
    ted = mc * 4
    out: list[tuple[str, tuple[int, ...], str]] = []
    td_out = list(transformer_depth if transformer_depth_output is None else transformer_depth_output)
    td_mid = max(1, transformer_depth[-1]) if transformer_depth_middle is None else transformer_depth_middle

    def lin(p, o, i, bias=True):
        out.append((f"{p}.weight", (o, i), "linear"))
        if bias:
            out.append((f"{p}.bias", (o,), "bias"))

    def conv(p, o, i, k):
        out.append((f"{p}.weight", (o, i, k, k), "conv"))
        out.append((f"{p}.bias", (o,), "bias"))

    def norm(p, c):
        out.append((f"{p}.weight", (c,), "norm_w"))
        out.append((f"{p}.bias", (c,), "norm_b"))

    def resblock(p, ci, co):
        norm(f"{p}.in_layers.0", ci)
        conv(f"{p}.in_layers.2", co, ci, 3)
        lin(f"{p}.emb_layers.1", co, ted)
        norm(f"{p}.out_layers.0", co)
        conv(f"{p}.out_layers.3", co, co, 3)
        if ci != co:
            conv(f"{p}.skip_connection", co, ci, 1)

    def proj(p, c):
        if use_linear_in_transformer:
            lin(p, c, c)
        else:
            conv(p, c, c, 1)

    def transformer(p, c, depth):
        norm(f"{p}.norm", c)
        proj(f"{p}.proj_in", c)
        for d in range(depth):
            b = f"{p}.transformer_blocks.{d}"
            for a, kv in (("attn1", c), ("attn2", context_dim)):
                lin(f"{b}.{a}.to_q", c, c, bias=False)
                lin(f"{b}.{a}.to_k", c, kv, bias=False)
                lin(f"{b}.{a}.to_v", c, kv, bias=False)
                lin(f"{b}.{a}.to_out.0", c, c)
            lin(f"{b}.ff.net.0.proj", c * 8, c)
            lin(f"{b}.ff.net.2", c, c * 4)
            for n in ("norm1", "norm2", "norm3"):
                norm(f"{b}.{n}", c)
        proj(f"{p}.proj_out", c)

    lin("time_embed.0", ted, mc)
    lin("time_embed.2", ted, ted)
    if adm_in_channels is not None:
        lin("label_emb.0.0", ted, adm_in_channels)
        lin("label_emb.0.2", ted, ted)
    conv("input_blocks.0.0", mc, in_channels, 3)
    chans = [mc]
    ch = mc
    idx = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{idx}.0", ch, mult * mc)
            ch = mult * mc
            if transformer_depth[level] > 0:
                transformer(f"input_blocks.{idx}.1", ch, transformer_depth[level])
            chans.append(ch)
            idx += 1
        if level != len(channel_mult) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            chans.append(ch)
            idx += 1
    resblock("middle_block.0", ch, ch)
    if td_mid > 0:
        transformer("middle_block.1", ch, td_mid)
    resblock("middle_block.2" if td_mid > 0 else "middle_block.1", ch, ch)
    idx = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            skip = chans.pop()
            resblock(f"output_blocks.{idx}.0", ch + skip, mc * mult)
            ch = mc * mult
            sub = 1
            if td_out[level] > 0:
                transformer(f"output_blocks.{idx}.1", ch, td_out[level])
                sub = 2
            if level and i == num_res_blocks:
                conv(f"output_blocks.{idx}.{sub}.conv", ch, ch, 3)
            idx += 1
    norm("out.0", ch)
    conv("out.2", out_channels, mc, 3)
    return out


def build_mini_sd15_unet(seed: int = 0, *, model_channels: int = 320,
                         channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                         transformer_depth: int | Sequence[int] = 1, context_dim: int = 768,
                         in_channels: int = 4, out_channels: int = 4, decay: float = 0.8,
                         bias_std: float = 0.01) -> dict[str, Any]:
    """A synthetic SD1.5-layout UNet state dict with ComfyUI's internal key names.

    Defaults: model_channels 320, context_dim 768, channel_mult (1, 2), one res block and
    one transformer block per level -- ~107M parameters, which ComfyUI's
    ``model_detection`` identifies as ``SD15`` (it keys on context_dim 768 and
    model_channels 320). ``channel_mult`` sets the depth (number of levels), e.g.
    ``(1,)`` for a reduced variant; ``transformer_depth`` is per level (0 = no attention).

    Linear and conv weights (conv flattened to ``[out, in*k*k]``) are
    ``power_law_matrix``: singular values ∝ i^-decay with random orthonormal singular
    vectors, Frobenius norm of an iid 1/sqrt(fan_in) init. Norm weights are ones, norm
    biases zeros, other biases N(0, bias_std²). float32; deterministic per (seed, key),
    so variants of different depth share the tensors they have in common.
    """
    import torch

    td = ([transformer_depth] * len(channel_mult) if isinstance(transformer_depth, int)
          else list(transformer_depth))
    if len(td) != len(channel_mult):
        raise ValueError("transformer_depth must have one entry per channel_mult level")
    layout = unet_layout(model_channels=model_channels, channel_mult=tuple(channel_mult),
                          num_res_blocks=num_res_blocks, transformer_depth=td,
                          context_dim=context_dim, in_channels=in_channels, out_channels=out_channels)
    sd: dict[str, Any] = {}
    for key, shape, kind in layout:
        if kind in ("linear", "conv"):
            rows, cols = shape[0], int(math.prod(shape[1:]))
            sd[key] = power_law_matrix(rows, cols, seed=seed, key=key, decay=decay).reshape(shape)
        elif kind == "norm_w":
            sd[key] = torch.ones(shape)
        elif kind == "norm_b":
            sd[key] = torch.zeros(shape)
        else:
            sd[key] = torch.randn(shape, generator=seeded_generator(seed, key)) * bias_std
    return sd


def fine_tune(sd: Mapping[str, Any], seed: int, strength: float = 0.05, *, rank: int = 8,
              dense_fraction: float = 0.5) -> dict[str, Any]:
    """A perturbed copy of ``sd`` standing in for a fine-tuned model.

    Each weight with ndim >= 2 (as a matrix ``[out, in*k*k]``) gets ``W + D`` with
    ``||D||_F = strength * ||W||_F``; D mixes a random rank-``rank`` part and a dense
    Gaussian part (``dense_fraction`` of the energy), as real fine-tunes move weights
    mostly along a few directions. 1-D tensors get ``+ strength * 0.1 * N(0, 1)``.
    Deterministic per (seed, key); the input is not modified.
    """
    import torch

    out: dict[str, Any] = {}
    for key, w in sd.items():
        g = seeded_generator(seed + 7919, key)
        if w.ndim >= 2:
            m = w.reshape(w.shape[0], -1).to(torch.float32)
            r = min(rank, *m.shape)
            low = torch.randn(m.shape[0], r, generator=g) @ torch.randn(r, m.shape[1], generator=g)
            dense = torch.randn(m.shape, generator=g)
            d = (math.sqrt(1 - dense_fraction) * low / low.norm()
                 + math.sqrt(dense_fraction) * dense / dense.norm())
            d = d * (strength * m.norm() / d.norm())
            out[key] = (m + d).reshape(w.shape).to(w.dtype)
        else:
            out[key] = (w + strength * 0.1 * torch.randn(w.shape, generator=g)).to(w.dtype)
    return out


def count_params(sd: Mapping[str, Any]) -> int:
    return sum(int(v.numel()) for v in sd.values())


# --------------------------------------------------------------------------------------
# Full synthetic SD1.5 checkpoints: UNet + CLIP-L text encoder + VAE.
# --------------------------------------------------------------------------------------

#: Checkpoint key prefixes of an SD1.x checkpoint (what ComfyUI's SD15 config reads).
SD15_UNET_PREFIX = "model.diffusion_model."
SD15_TE_PREFIX = "cond_stage_model."
SD15_VAE_PREFIX = "first_stage_model."

#: The ddconfig ``comfy.sd.VAE`` uses for SD1.x/SD2.x VAEs (its "default SD1.x/SD2.x VAE
#: parameters" branch, ComfyUI 0.3.75 comfy/sd.py); with ``post_quant_conv`` in the state dict
#: it builds ``AutoencoderKL(ddconfig=..., embed_dim=4)``.
SD1_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                    "dropout": 0.0}

_SD15_LAYOUT: dict[str, dict[str, tuple[int, ...]]] = {}


def sd15_te_vae_layout() -> dict[str, dict[str, tuple[int, ...]]]:
    """``{"text_encoder": {key: shape}, "vae": {key: shape}}`` with checkpoint key names.

    Taken from ComfyUI's own classes, instantiated on the ``meta`` device (no memory, ~10 ms):
    the SD15 model config's clip target (``sd1_clip.SD1ClipModel``, CLIP-L) whose state dict
    goes through ``SD15.process_clip_state_dict_for_saving`` -- exactly what ComfyUI's
    CheckpointSave writes (``cond_stage_model.transformer.text_model.*``; ``text_projection``
    and ``logit_scale`` are dropped, as in real SD1.5 checkpoints) -- and
    ``comfy.ldm.models.autoencoder.AutoencoderKL`` with :data:`SD1_VAE_DDCONFIG`, prefixed with
    the config's ``vae_key_prefix`` (``first_stage_model.``).
    Needs the ComfyUI tree (calls :func:`prepare_early`); cached per process.
    """
    if _SD15_LAYOUT:
        return _SD15_LAYOUT
    early = prepare_early()
    if early["tree"] is None:
        raise RuntimeError(f"No ComfyUI {COMFYUI_VERSION} tree found ({early['how']}): {SETUP_HINT}.")
    import torch
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = comfy.supported_models.SD15({})
    target = config.clip_target()
    with torch.device("meta"):
        te = target.clip(device="meta", dtype=torch.float32)
        vae = AutoencoderKL(ddconfig=dict(SD1_VAE_DDCONFIG), embed_dim=4)
    te_sd = config.process_clip_state_dict_for_saving(dict(te.state_dict()))
    (vae_prefix,) = config.vae_key_prefix
    _SD15_LAYOUT["text_encoder"] = {k: tuple(v.shape) for k, v in te_sd.items()}
    _SD15_LAYOUT["vae"] = {vae_prefix + k: tuple(v.shape) for k, v in vae.state_dict().items()}
    bad = [k for k in _SD15_LAYOUT["text_encoder"] if not k.startswith(SD15_TE_PREFIX)]
    if bad or vae_prefix != SD15_VAE_PREFIX:
        raise RuntimeError(f"unexpected SD15 checkpoint layout in this ComfyUI: {bad[:3]} {vae_prefix!r}")
    return _SD15_LAYOUT


def spectral_matrix(rows: int, cols: int, *, seed: int = 0, key: str = "", decay: float = 0.8,
                    gain: float = 1.0):
    """Like :func:`power_law_matrix` (``U diag(s) Vᵀ``, ``s_i ∝ i^-decay``, ``‖W‖_F = gain·√rows``)
    but with structured orthonormal factors, built in O(rows·cols·log) instead of QR + matmul.

    ``U = D_r C_rᵀ P_r``, ``V = D_c C_cᵀ P_c``: orthonormal DCT-II bases ``C`` with random column
    permutations ``P`` and random row signs ``D``, so ``W = D_r · idct2(S) · D_c`` where ``S``
    holds the singular values on randomly permuted positions. The singular values are exact and
    the singular vectors are delocalised (every entry ±O(1/√n)), like a random basis, and
    different (seed, key) give incoherent bases. Used for the text encoder (72 matrices, ~1 s in
    all) where QR-based construction takes 10-30 s on a busy 2-core machine. float32.
    """
    import numpy as np
    import scipy.fft
    import torch

    g = seeded_generator(seed, key)
    r = min(rows, cols)
    s = torch.arange(1, r + 1, dtype=torch.float64).pow(-decay)
    s = s * (gain * math.sqrt(rows) / s.norm())
    pr = torch.randperm(rows, generator=g)[:r].numpy()
    pc = torch.randperm(cols, generator=g)[:r].numpy()
    dr = (torch.randint(0, 2, (rows, 1), generator=g) * 2 - 1).numpy()
    dc = (torch.randint(0, 2, (1, cols), generator=g) * 2 - 1).numpy()
    S = np.zeros((cols, rows), dtype=np.float32)  # transposed: scipy's DCT is ~4× faster along
    S[pc, pr] = s.numpy()                         # the last axis, so keep the long one there
    Wt = scipy.fft.idctn(S, type=2, norm="ortho") * dc.T * dr.T
    return torch.from_numpy(np.ascontiguousarray(Wt.T, dtype=np.float32))


def build_sd15_text_encoder(seed: int = 0, *, dtype=None, decay: float = 0.8, bias_std: float = 0.01,
                            token_std: float = 0.02, position_std: float = 0.01) -> dict[str, Any]:
    """A CLIP-L text encoder for SD1.5 with random weights, keyed ``cond_stage_model.*``.

    Keys and shapes from :func:`sd15_te_vae_layout` (ComfyUI's own ``SD1ClipModel``). Linear
    weights (attention q/k/v/out, MLP fc1/fc2) are :func:`spectral_matrix` (power-law spectrum
    with the norm of an iid ``1/√fan_in`` init, so subspace similarity behaves as for trained
    weights); layer norms are weight 1 / bias 0; biases N(0, bias_std²); token embeddings
    N(0, token_std²), position embeddings N(0, position_std²). The pre-LN transformer keeps
    every activation finite. ``dtype`` (default float32) is the stored dtype; ComfyUI runs the
    text encoder in float16 on CPU anyway. ~123M parameters; deterministic per (seed, key).
    """
    import torch

    dtype = dtype or torch.float32
    out: dict[str, Any] = {}
    for key, shape in sd15_te_vae_layout()["text_encoder"].items():
        if "layer_norm" in key:
            t = torch.ones(shape) if key.endswith(".weight") else torch.zeros(shape)
        elif key.endswith("token_embedding.weight"):
            t = torch.randn(shape, generator=seeded_generator(seed, key)) * token_std
        elif key.endswith("position_embedding.weight"):
            t = torch.randn(shape, generator=seeded_generator(seed, key)) * position_std
        elif len(shape) == 2:
            t = spectral_matrix(shape[0], shape[1], seed=seed, key=key, decay=decay)
        elif key.endswith(".bias"):
            t = torch.randn(shape, generator=seeded_generator(seed, key)) * bias_std
        else:
            raise RuntimeError(f"no initialisation rule for text-encoder key {key} {shape}")
        out[key] = t.to(dtype)
    return out


def build_sd15_vae(seed: int = 0, *, dtype=None, bias_std: float = 0.01) -> dict[str, Any]:
    """The SD1.x VAE (``AutoencoderKL``, ch 128, ch_mult 1-2-4-4, ~84M parameters) with random
    weights, keyed ``first_stage_model.*``: conv weights N(0, 1/fan_in), group norms weight 1 /
    bias 0, biases N(0, bias_std²). GroupNorm in every block keeps the decoder's output finite
    (ComfyUI clamps it to [0, 1]). Decoding a 64×64 image costs well under a second on CPU.
    ``dtype`` (default float32) is the stored dtype; ComfyUI decodes in float32 on CPU."""
    import torch

    dtype = dtype or torch.float32
    out: dict[str, Any] = {}
    for key, shape in sd15_te_vae_layout()["vae"].items():
        if len(shape) == 1 and ("norm" in key.rsplit(".", 2)[-2]):
            t = torch.ones(shape) if key.endswith(".weight") else torch.zeros(shape)
        elif len(shape) >= 2:
            fan_in = int(math.prod(shape[1:]))
            t = torch.randn(shape, generator=seeded_generator(seed, key)) / math.sqrt(fan_in)
        else:
            t = torch.randn(shape, generator=seeded_generator(seed, key)) * bias_std
        out[key] = t.to(dtype)
    return out


def build_full_sd15_checkpoint(unet_sd: Mapping[str, Any], seed: int = 0, *,
                               text_encoder: Mapping[str, Any] | None = None,
                               vae: Mapping[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """A complete SD1.5 checkpoint state dict: ``model.diffusion_model.*`` (``unet_sd``, e.g.
    :func:`build_mini_sd15_unet`), ``cond_stage_model.*`` (CLIP-L) and ``first_stage_model.*``
    (VAE), so that the stock ``CheckpointLoaderSimple`` returns a working MODEL, CLIP and VAE.

    ``text_encoder`` / ``vae`` (checkpoint-keyed, e.g. from :func:`build_sd15_text_encoder`,
    :func:`fine_tune_text_encoder`) are used when given, else built from ``seed`` with ``dtype``
    (default float16 for these two parts, like the fp16 SD1.5 checkpoints people download: ComfyUI
    runs the text encoder in float16 on CPU anyway, so nothing is lost, and the file is 0.4 GB
    smaller). The UNet tensors are used as they are (not copied).
    """
    import torch

    dtype = dtype or torch.float16
    te = text_encoder if text_encoder is not None else build_sd15_text_encoder(seed, dtype=dtype)
    v = vae if vae is not None else build_sd15_vae(seed, dtype=dtype)
    out: dict[str, Any] = {SD15_UNET_PREFIX + k: t for k, t in unet_sd.items()}
    for part, prefix in ((te, SD15_TE_PREFIX), (v, SD15_VAE_PREFIX)):
        bad = [k for k in part if not k.startswith(prefix)]
        if bad:
            raise ValueError(f"expected keys starting with {prefix!r}, got e.g. {bad[0]!r}")
        out.update(part)
    return out


def fine_tune_text_encoder(te_sd: Mapping[str, Any], seed: int, strength: float = 0.05,
                           decay: float = 1.0) -> dict[str, Any]:
    """A "fine-tuned" copy of a checkpoint-keyed text encoder: every transformer-layer matrix
    (``...encoder.layers.*``: attention, MLP) gets ``W + P`` with ``‖P‖_F = strength·‖W‖_F`` and P
    a :func:`spectral_matrix` of its own (power-law spectrum ``i^-decay``, random basis: a change
    concentrated on a few directions, as fine-tunes are); layer-norm weights and biases get
    ``+ strength·0.1·N(0, 1)``. Embeddings and the final layer norm are shared unchanged (same
    tensor objects). ~1 s (a dense Gaussian perturbation as in :func:`fine_tune` takes ~7 s here).
    Deterministic per (seed, key); the input is not modified."""
    import torch

    out = dict(te_sd)
    for key, w in te_sd.items():
        if ".encoder.layers." not in key:
            continue
        if w.ndim >= 2:
            m = w.reshape(w.shape[0], -1).to(torch.float32)
            p = spectral_matrix(m.shape[0], m.shape[1], seed=seed + 7919, key=key, decay=decay)
            p = p * (strength * m.norm() / p.norm())
            out[key] = (m + p).reshape(w.shape).to(w.dtype)
        else:
            g = seeded_generator(seed + 7919, key)
            out[key] = (w.to(torch.float32) + strength * 0.1 * torch.randn(w.shape, generator=g)).to(w.dtype)
    return out
