"""Mini models of the model families people run now, built from ComfyUI's own classes, and
LoRAs for them in the layouts their popular trainers write (no ComfyUI import at module level).

Each :class:`FamilyCase` holds the configuration ComfyUI's detection derives from the state dict
(``comfy/model_detection.py``); the layout comes from instantiating the host's model class for
it on the meta device (``model_config.get_model(device="meta")``), so key names and shapes are
the host's. The tests load the files through UNETLoader, so ComfyUI's detection decides the class.

Widths, as ComfyUI 0.3.75 detects them:

* **narrow** (the width follows the weights): Wan 2.1 / 2.2 (``dim // 128`` heads → 128 wide, one
  block), HunyuanVideo and 1.5 (``hidden // 128`` heads → 128), LTX-Video (32 heads of
  ``to_k rows // 32`` → 4 per head, 128 wide);
* **fixed** (detection or the class's defaults fix it): Qwen-Image 3072 (24 heads of 128 are class
  defaults), Z-Image 3840 (the width *is* what tells it from Lumina 2; two noise and two context
  refiner layers come with it), Chroma 3072 (Flux's 24 heads of 128; its distilled guidance
  layer is 5 × 5120 wide), Flux.2 6144 (48 heads of 128). These keep the Flux tests' approach
  (``tests/dit_models.py``): one block, closed-form SVDs (:class:`~dit_models.KnownSVD`) on the
  layers the LoRA touches, zeros elsewhere, loaded as fp8 so a pair stays within ~2.5 GB;
* **HiDream** cannot be made small: detection fixes 16 double and 32 single blocks 2560 wide with
  4 experts each (17 B parameters), so only its layout (meta device) is used, for names.

Only the layers a LoRA touches carry values; the target is the source plus a 5 % perturbation
of those (:func:`host.fine_tune`), a fine-tune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import dit_models as dm
import host

_WAN = dict(image_model="wan2.1", patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
            eps=1e-6, freq_dim=256, dim=128, ffn_dim=256, num_heads=1, num_layers=1, in_dim=16, out_dim=16)
_HUNYUAN = dict(image_model="hunyuan_video", in_channels=16, patch_size=[1, 2, 2], out_channels=16, vec_in_dim=768,
                axes_dim=[16, 56, 56], meanflow=False, context_in_dim=64, hidden_size=128, mlp_ratio=4.0,
                num_heads=1, depth=1, depth_single_blocks=1, theta=256, qkv_bias=True, byt5=False,
                guidance_embed=True, use_cond_type_embedding=False, vision_in_dim=None)
_FLUX_LIKE = dict(axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, qkv_bias=True, hidden_size=3072,
                  patch_size=2, depth=1, depth_single_blocks=1)
FLUX2_CONFIG = dict(image_model="flux2", axes_dim=[32, 32, 32, 32], num_heads=48, mlp_ratio=3.0, theta=2000,
                    out_channels=128, global_modulation=True, vec_in_dim=None, mlp_silu_act=True, qkv_bias=False,
                    ops_bias=False, default_ref_method="index", ref_index_scale=10.0, patch_size=1, in_channels=128,
                    hidden_size=6144, context_in_dim=64, depth=1, depth_single_blocks=0, guidance_embed=False)
HIDREAM_CONFIG = dict(image_model="hidream", attention_head_dim=128, axes_dims_rope=[64, 32, 32],
                      caption_channels=[4096, 4096], max_resolution=[128, 128], in_channels=16,
                      llama_layers=list(range(32)) + [31] * 16, num_attention_heads=20, num_routed_experts=4,
                      num_activated_experts=2, num_layers=16, num_single_layers=32, out_channels=16, patch_size=2,
                      text_emb_dim=2048)


@dataclass(frozen=True)
class FamilyCase:
    """One family: its mini configuration, the LoRA a trainer writes for it, what to expect.

    ``modules`` maps the adapter's module names to ``(model key, rows)``: rows ``(start, size)``
    of a fused weight the module adapts (ai-toolkit's ``to_q`` of Z-Image's ``attention.qkv``),
    or None for the whole weight. ``layout`` is ``"kohya"`` (lora_up / lora_down / alpha: kohya,
    musubi-tuner) or ``"peft"`` (lora_B / lora_A: diffusers, PEFT, ai-toolkit, diffusion-pipe).
    ``full`` overrides the configuration to the released model's width (names only, meta device).
    """

    id: str
    kind: str
    config: Mapping[str, Any]
    modules: Mapping[str, tuple[str, tuple[int, int] | None]]
    layout: str
    made_for: str
    blocks: Mapping[str, list[str]]
    full: Mapping[str, Any] = field(default_factory=dict)
    wide: bool = False

    @property
    def dtype(self) -> str:
        """UNETLoader's weight dtype: fp8 for the full-width families (module docstring)."""
        return "fp8_e4m3fn" if self.wide else "default"


Q = 3072
Z = 3840
CASES: tuple[FamilyCase, ...] = (
    # Wan 2.1 → 2.2 A14B (one class in ComfyUI: WAN21_T2V), musubi-tuner's kohya names.
    FamilyCase("wan21_t2v", "WAN21_T2V", {**_WAN, "model_type": "t2v"},
               {"lora_unet_blocks_0_self_attn_q": ("blocks.0.self_attn.q.weight", None),
                "lora_unet_blocks_0_cross_attn_k": ("blocks.0.cross_attn.k.weight", None),
                "lora_unet_blocks_0_ffn_0": ("blocks.0.ffn.0.weight", None)},
               "kohya", "Wan", {"blocks.0": ["self_attn.q", "cross_attn.k", "ffn.0"]},
               full=dict(dim=5120, ffn_dim=13824, num_heads=40)),
    # A T2V LoRA (no k_img / v_img) on Wan 2.1 I2V, in ComfyUI's own (diffusers-style) names.
    FamilyCase("wan21_i2v", "WAN21_I2V", {**_WAN, "model_type": "i2v", "in_dim": 36},
               {"diffusion_model.blocks.0.self_attn.v": ("blocks.0.self_attn.v.weight", None),
                "diffusion_model.blocks.0.cross_attn.o": ("blocks.0.cross_attn.o.weight", None),
                "diffusion_model.blocks.0.ffn.2": ("blocks.0.ffn.2.weight", None)},
               "peft", "Wan", {"blocks.0": ["self_attn.v", "cross_attn.o", "ffn.2"]},
               full=dict(dim=5120, ffn_dim=13824, num_heads=40)),
    # Wan 2.2 TI2V-5B (48-channel latents), musubi-tuner.
    FamilyCase("wan22_ti2v", "WAN22_T2V", {**_WAN, "model_type": "t2v", "in_dim": 48, "out_dim": 48},
               {"lora_unet_blocks_0_self_attn_k": ("blocks.0.self_attn.k.weight", None),
                "lora_unet_blocks_0_cross_attn_q": ("blocks.0.cross_attn.q.weight", None)},
               "kohya", "Wan", {"blocks.0": ["self_attn.k", "cross_attn.q"]},
               full=dict(dim=3072, ffn_dim=14336, num_heads=24)),
    # HunyuanVideo, diffusion-pipe's names (img_attn_qkv, linear1 under transformer.).
    FamilyCase("hunyuan_video", "HunyuanVideo", _HUNYUAN,
               {"transformer.double_blocks.0.img_attn_qkv": ("double_blocks.0.img_attn.qkv.weight", None),
                "transformer.double_blocks.0.txt_mlp.fc1": ("double_blocks.0.txt_mlp.0.weight", None),
                "transformer.single_blocks.0.linear2": ("single_blocks.0.linear2.weight", None)},
               "peft", "HunyuanVideo",
               {"double_blocks.0": ["img_attn.qkv", "txt_mlp.0"], "single_blocks.0": ["linear2"]},
               full=dict(hidden_size=3072, num_heads=24, context_in_dim=4096)),
    # HunyuanVideo 1.5 (double blocks only, vision input), musubi-tuner's kohya names.
    FamilyCase("hunyuan_video15", "HunyuanVideo15",
               {**_HUNYUAN, "patch_size": [1, 1, 1], "vec_in_dim": None, "depth_single_blocks": 0, "byt5": True,
                "guidance_embed": False, "use_cond_type_embedding": True, "vision_in_dim": 1152},
               {"lora_unet_double_blocks_0_img_attn_proj": ("double_blocks.0.img_attn.proj.weight", None),
                "lora_unet_double_blocks_0_txt_attn_qkv": ("double_blocks.0.txt_attn.qkv.weight", None),
                "lora_unet_double_blocks_0_img_mod_lin": ("double_blocks.0.img_mod.lin.weight", None)},
               "kohya", "HunyuanVideo 1.5", {"double_blocks.0": ["img_attn.proj", "img_mod", "txt_attn.qkv"]},
               full=dict(hidden_size=2048, num_heads=16, context_in_dim=3584)),
    # LTX-Video, the trainer's ComfyUI-format names (diffusion_model.…, PEFT factors).
    FamilyCase("ltxv", "LTXV", dict(image_model="ltxv", num_layers=1, attention_head_dim=4, cross_attention_dim=64),
               {"diffusion_model.transformer_blocks.0.attn1.to_q": ("transformer_blocks.0.attn1.to_q.weight", None),
                "diffusion_model.transformer_blocks.0.attn2.to_v": ("transformer_blocks.0.attn2.to_v.weight", None),
                "diffusion_model.transformer_blocks.0.ff.net.0.proj": ("transformer_blocks.0.ff.net.0.proj.weight",
                                                                       None)},
               "peft", "LTX-Video", {"transformer_blocks.0": ["attn1.to_q", "attn2.to_v", "ff.0"]},
               full=dict(attention_head_dim=64, cross_attention_dim=4096)),
    # Qwen-Image → an Edit-style fine-tune, diffusers / PEFT names.
    FamilyCase("qwen_image", "QwenImage", dict(image_model="qwen_image", in_channels=64, num_layers=1),
               {"transformer.transformer_blocks.0.attn.to_q": ("transformer_blocks.0.attn.to_q.weight", None),
                "transformer.transformer_blocks.0.attn.add_k_proj": ("transformer_blocks.0.attn.add_k_proj.weight",
                                                                     None),
                "transformer.transformer_blocks.0.img_mlp.net.0.proj":
                    ("transformer_blocks.0.img_mlp.net.0.proj.weight", None)},
               "peft", "Qwen-Image", {"transformer_blocks.0": ["attn.to_q", "attn.add_k_proj", "img_mlp.0"]},
               wide=True),
    # Z-Image base → a turbo-style fine-tune, ai-toolkit: q/k/v slices of the fused attention.qkv.
    FamilyCase("zimage", "ZImage",
               dict(image_model="lumina2", patch_size=2, in_channels=16, dim=Z, cap_feat_dim=64, n_layers=1,
                    qk_norm=True, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
                    rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
                    pad_tokens_multiple=32),
               {f"diffusion_model.layers.0.attention.to_{p}": ("layers.0.attention.qkv.weight", (i * Z, Z))
                for i, p in enumerate("qkv")},
               "peft", "Z-Image", {"layers.0": ["attention.qkv[q]", "attention.qkv[k]", "attention.qkv[v]"]},
               wide=True),
    # Chroma (Flux without modulation layers), ai-toolkit's diffusers names: slices of the fused qkv.
    FamilyCase("chroma", "Chroma",
               dict(image_model="chroma", **_FLUX_LIKE, out_channels=64, in_channels=64, context_in_dim=64, in_dim=64,
                    out_dim=3072, hidden_dim=5120, n_layers=5),
               {"transformer.transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv.weight", (0, Q)),
                "transformer.transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv.weight",
                                                                     (2 * Q, Q)),
                "transformer.single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1.weight", (Q, Q))},
               "peft", "Flux.1 or Chroma", {"double_blocks.0": ["img_attn.qkv[q]", "txt_attn.qkv[v]"],
                                            "single_blocks.0": ["linear1[k]"]},
               wide=True),
)
CASE = {c.id: c for c in CASES}


def layout(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the diffusion model ComfyUI builds for ``config`` (meta device)."""

    def build(ops):
        import comfy.model_detection
        import torch

        model_config = comfy.model_detection.model_config_from_unet_config(dict(config))
        if model_config is None:
            raise ValueError(f"the host has no model class for {config.get('image_model')}")
        with torch.device("meta"):
            return model_config.get_model({}, "", device="meta").diffusion_model

    return dm._meta_layout(f"family|{sorted((k, str(v)) for k, v in config.items())}", build)


def _known(shape, rows, seed: int, key: str):
    """The closed-form matrix of a touched weight (or of its rows ``rows``; other rows random)."""
    import torch

    if rows is None:
        return dm.KnownSVD.make(shape[0], shape[1], seed=seed, key=key).matrix()
    w = torch.randn(shape, generator=host.seeded_generator(seed, key)) / math.sqrt(shape[1])
    for start, size in sorted(rows):
        w[start:start + size] = dm.KnownSVD.make(size, shape[1], seed=seed, key=f"{key}[{start}]").matrix()
    return w


def build_pair(case: FamilyCase, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(source, fine-tune)`` state dicts: the touched layers closed-form (float32), the target
    5 % away from them; every other weight zero (bfloat16 for the wide ones), norms one."""
    import torch

    shapes = layout(case.config)
    touched: dict[str, set] = {}
    for key, rows in case.modules.values():
        touched.setdefault(key, set())
        if rows is not None:
            touched[key].add(rows)
    rest = build_model(case.config, dict.fromkeys(touched), zero_dtype=torch.bfloat16 if case.wide else None)
    rest = {k: v for k, v in rest.items() if k not in touched}
    known = {k: _known(shapes[k], rows or None, seed, k) for k, rows in touched.items()}
    return {**rest, **known}, {**rest, **host.fine_tune(known, seed=seed + 1, strength=0.05)}


def build_model(config: Mapping[str, Any], weights: Mapping[str, Any], *, zero_dtype=None) -> dict[str, Any]:
    """A state dict of ``config``'s layout: ``weights`` where given, zeros elsewhere (norms one);
    ``zero_dtype`` (default float32) for the zero matrices, vectors in bfloat16 when it is narrower."""
    import torch

    zero_dtype = zero_dtype or torch.float32
    vector_dtype = torch.float32 if zero_dtype == torch.float32 else torch.bfloat16
    out = {k: (torch.ones if k.endswith((".scale", "norm.weight")) else torch.zeros)(
        s, dtype=zero_dtype if len(s) >= 2 else vector_dtype) for k, s in layout(config).items() if k not in weights}
    return {**out, **weights}


def lora_for(case: FamilyCase, shapes: Mapping[str, tuple[int, ...]], rng, rank: int = 4) -> tuple[dict, dict]:
    """``(factors by module, LoRA file tensors)`` of ``case.modules`` for a model of ``shapes``."""
    dims = {}
    for module, (key, rows) in case.modules.items():
        m, n = shapes[key][:2]
        dims[module] = (rows[1] if rows else m, n)
    factors = dm.lora_factors(dims, rng, rank=rank)
    tensors = dm.kohya_lora(factors, alpha=float(rank)) if case.layout == "kohya" else dm.diffusers_lora(factors)
    return factors, tensors


# --------------------------------------------------------------------------------------------
# Families the scan must name, at the released models' widths (names only, no weights)
# --------------------------------------------------------------------------------------------

#: LTX-2's audio-video blocks (ComfyUI 0.33's comfy/ldm/lightricks/av_model.py: attn1, audio_attn1,
#: audio_to_video_attn, video_to_audio_attn, ff, audio_ff). ComfyUI 0.3.75 has no LTX-2 class, so
#: these names are written out rather than read from a layout.
LTX2_MODULES = {f"diffusion_model.transformer_blocks.0.{m}": (rows, 4096) for m, rows in (
    ("attn1.to_q", 4096), ("audio_attn1.to_q", 2048), ("audio_to_video_attn.to_k", 4096),
    ("video_to_audio_attn.to_q", 2048), ("audio_ff.net.0.proj", 8192))}
#: HiDream (SimpleTuner's diffusers names under transformer.): attention and the shared expert.
HIDREAM_MODULES = {f"transformer.{m}": f"{m}.weight" for m in (
    "double_stream_blocks.0.block.attn1.to_q", "double_stream_blocks.0.block.ff_i.shared_experts.w1",
    "single_stream_blocks.0.block.attn1.to_v")}
#: Wan at other widths than CASE["wan21_t2v"] (128 wide, FFN 256): both detected as WAN21_T2V.
WAN_WIDER = {**_WAN, "model_type": "t2v", "dim": 256, "num_heads": 2, "ffn_dim": 512}
WAN_WIDER_FFN = {**_WAN, "model_type": "t2v", "ffn_dim": 512}
#: Flux.2 dev: a kohya LoRA on the first double block's attention, as trainers write for it.
FLUX2_MODULES = {"lora_unet_double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv.weight",
                 "lora_unet_double_blocks_0_txt_attn_proj": "double_blocks.0.txt_attn.proj.weight"}


def library_of_families(rng) -> dict[str, tuple[dict[str, Any], str]]:
    """``{file name: (LoRA tensors at the released model's width, family the scan must name)}``."""
    out = {}
    for case in CASES:
        shapes = layout({**case.config, **case.full})
        out[f"{case.id}.safetensors"] = (lora_for(case, shapes, rng, rank=2)[1], case.made_for)
    shapes = layout(HIDREAM_CONFIG)
    hidream = dm.lora_factors({m: shapes[k] for m, k in HIDREAM_MODULES.items()}, rng, rank=2)
    out["hidream.safetensors"] = (dm.diffusers_lora(hidream), "HiDream")
    shapes = layout(FLUX2_CONFIG)
    flux2 = dm.lora_factors({m: shapes[k] for m, k in FLUX2_MODULES.items()}, rng, rank=2)
    out["flux2.safetensors"] = (dm.kohya_lora(flux2, alpha=2.0), "Flux.2")
    shapes = layout({**CASE["wan21_i2v"].config, **CASE["wan21_i2v"].full})
    i2v = dm.lora_factors({f"lora_unet_blocks_0_cross_attn_{m}": shapes[f"blocks.0.cross_attn.{m}.weight"]
                           for m in ("k_img", "v_img", "q")}, rng, rank=2)
    out["wan_i2v_image_layers.safetensors"] = (dm.kohya_lora(i2v, alpha=2.0), "Wan I2V")
    out["ltx2.safetensors"] = (dm.diffusers_lora(dm.lora_factors(LTX2_MODULES, rng, rank=2)), "LTX-2")
    return out
