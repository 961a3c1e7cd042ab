"""Mini Flux- and SD3-shaped diffusion models that ComfyUI's own model detection accepts, and
LoRAs for them in the layouts trainers write (no ComfyUI import at module level).

Key names and shapes come from ComfyUI's own classes (``comfy.ldm.flux.model.Flux`` and
``comfy.ldm.modules.diffusionmodules.mmdit.MMDiT``) instantiated on the meta device with the
configuration ``comfy/model_detection.py`` derives from such a state dict; the tests then load
the files through ComfyUI (``UNETLoader``) and check the detected class and keys.

* **Flux** cannot be narrowed: detection fixes 24 heads and rotary axes of 16 + 56 + 56 = 128
  per head, so the hidden size must be 3072 (``Flux.__init__`` refuses anything else). The mini
  model keeps the real width with 1 double and 1 single block (text and vector inputs reduced to
  64 features): ~531 M parameters. To keep it cheap, only the layers the tests decompose carry
  values (:data:`FLUX_KNOWN`); every other weight is zero. A known layer — or each known slice of
  a fused layer — is a :class:`KnownSVD` matrix, built in O(n log n) with its singular vectors
  known in closed form, so the tests' float64 reference needs no SVD of a 3072-wide matrix.
  The *target* (schnell: no ``guidance_in``) holds those matrices; the *source* (dev) is the
  target plus a 5 % perturbation (:func:`host.fine_tune`), a close relative as dev and schnell are.
* **SD3** narrows freely (hidden = 64 · depth): depth 2 gives hidden 128, two joint blocks (the
  last one's context stream is "pre-only": qkv and modulation, as in SD3), and an SD3.5-style
  second self-attention (``x_block.attn2``) in block 0; every weight random with a power-law
  spectrum (:func:`host.power_law_matrix`), ~1.6 M parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import host

HIDDEN = 3072
#: The Flux configuration detect_unet_config derives from the mini state dict (see the module docstring).
FLUX_MINI_CONFIG = dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000,
                        out_channels=16, qkv_bias=True, in_channels=16, hidden_size=HIDDEN, context_in_dim=64,
                        patch_size=2, vec_in_dim=64, depth=1, depth_single_blocks=1)
#: Layers of the mini Flux that carry values, and which parts of them have a closed-form SVD:
#: the whole weight (None) or row slices (start, size); the other rows of such a weight are
#: random (N(0, 1/cols)), so that "left untouched" is checked on real values. Block 0's
#: img_attn.qkv and the single block's modulation are whole (kohya LoRAs adapt whole fused
#: weights); txt_attn.qkv has known q and k slices and linear1 a known MLP-input slice (rows
#: 3·3072 to 7·3072), the slices diffusers LoRAs adapt.
FLUX_KNOWN: dict[str, Sequence[tuple[int, int]] | None] = {
    "double_blocks.0.img_attn.qkv.weight": None,
    "single_blocks.0.modulation.lin.weight": None,
    "double_blocks.0.txt_attn.qkv.weight": [(0, HIDDEN), (HIDDEN, HIDDEN)],
    "single_blocks.0.linear1.weight": [(3 * HIDDEN, 4 * HIDDEN)],
}
SD3_MINI_CONFIG = dict(in_channels=16, patch_size=2, out_channels=16, depth=2, input_size=None, adm_in_channels=64,
                       context_embedder_config={"target": "torch.nn.Linear",
                                                "params": {"in_features": 64, "out_features": 128}},
                       num_patches=32 * 32, pos_embed_max_size=32, pos_embed_scaling_factor=None,
                       x_block_self_attn_layers=[0])

_LAYOUTS: dict[str, dict[str, tuple[int, ...]]] = {}


def _meta_layout(name: str, build) -> dict[str, tuple[int, ...]]:
    if name not in _LAYOUTS:
        early = host.prepare_early()
        if early["tree"] is None:
            raise RuntimeError(f"No ComfyUI tree found ({early['how']}): {host.SETUP_HINT}.")
        import comfy.ops
        import torch

        with torch.device("meta"):
            model = build(comfy.ops.disable_weight_init)
        _LAYOUTS[name] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _LAYOUTS[name]


def flux_layout(guidance: bool = True, **overrides) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a Flux diffusion model (dev with ``guidance``, schnell without), from
    ComfyUI's ``Flux`` class; ``overrides`` change the configuration (e.g. ``depth=19``)."""
    cfg = {**FLUX_MINI_CONFIG, **overrides, "guidance_embed": guidance}

    def build(ops):
        import dataclasses

        from comfy.ldm.flux.model import Flux, FluxParams

        # Hosts since 0.3.75 added required FluxParams fields (0.33: txt_ids_dims, which its model
        # detection sets to [] for Flux.1); fill the ones this host has with Flux.1's values.
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
            cfg.setdefault("txt_ids_dims", [])

        return Flux(**cfg, device="meta", operations=ops)

    return _meta_layout(f"flux|{sorted(cfg.items())}", build)


def sd3_layout(**overrides) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of an SD3 MMDiT from ComfyUI's ``MMDiT`` class (mini configuration)."""
    cfg = {**SD3_MINI_CONFIG, **overrides}
    if "depth" in overrides:
        cfg["context_embedder_config"] = {"target": "torch.nn.Linear",
                                          "params": {"in_features": 64, "out_features": 64 * cfg["depth"]}}

    def build(ops):
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

        return MMDiT(**cfg, device="meta", operations=ops)

    return _meta_layout(f"sd3|{sorted((k, str(v)) for k, v in cfg.items())}", build)


# --------------------------------------------------------------------------------------------
# Matrices with a closed-form SVD
# --------------------------------------------------------------------------------------------


@dataclass
class KnownSVD:
    """``W = Σ sᵢ uᵢ vᵢᵀ`` with ``uᵢ = D_r·idct(e_{pr[i]})``, ``vᵢ = D_c·idct(e_{pc[i]})``: orthonormal
    DCT-II basis vectors (distinct, randomly chosen) with random signs, ``sᵢ ∝ i^-decay`` and
    ``‖W‖_F = √rows`` (an iid ``1/√cols`` init's norm). The same construction as
    :func:`host.spectral_matrix`, here with the factors: ``matrix()`` costs a 2-D inverse DCT, and
    ``top(k)`` gives the exact leading singular triplets (float64) for references."""

    rows: int
    cols: int
    s: Any
    pr: Any
    pc: Any
    dr: Any
    dc: Any

    @staticmethod
    def make(rows: int, cols: int, *, seed: int, key: str, decay: float = 0.8) -> "KnownSVD":
        import torch

        g = host.seeded_generator(seed, key)
        r = min(rows, cols)
        s = torch.arange(1, r + 1, dtype=torch.float64).pow(-decay)
        s = s * (math.sqrt(rows) / s.norm())
        return KnownSVD(rows, cols, s.numpy(), torch.randperm(rows, generator=g)[:r].numpy(),
                        torch.randperm(cols, generator=g)[:r].numpy(),
                        (torch.randint(0, 2, (rows,), generator=g) * 2 - 1).double().numpy(),
                        (torch.randint(0, 2, (cols,), generator=g) * 2 - 1).double().numpy())

    def matrix(self):
        """float32 ``rows × cols``."""
        import numpy as np
        import scipy.fft
        import torch

        # Transposed (the long axis last is faster) and in float32: the transform's rounding
        # (~1e-7·‖W‖) is that of storing the weight in float32 anyway.
        S = np.zeros((self.cols, self.rows), dtype=np.float32)
        S[self.pc, self.pr] = self.s
        Wt = scipy.fft.idctn(S, type=2, norm="ortho", workers=2)
        Wt *= self.dc[:, None].astype(np.float32)
        Wt *= self.dr[None, :].astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(Wt.T, dtype=np.float32))

    def top(self, k: int):
        """``(U rows×k, S k, V cols×k)`` float64 numpy: the exact top-k singular triplets."""
        import numpy as np
        import scipy.fft

        def vectors(n, positions, signs):
            E = np.zeros((n, k))
            E[positions[:k], np.arange(k)] = 1.0
            return scipy.fft.idct(E, type=2, norm="ortho", axis=0) * signs[:, None]

        return vectors(self.rows, self.pr, self.dr), self.s[:k].copy(), vectors(self.cols, self.pc, self.dc)


def flux_known_svd(key: str, seed: int, start: int | None = None, size: int | None = None) -> KnownSVD:
    """The closed-form layer (or slice ``start:start+size`` of it) of the mini Flux *target*."""
    rows, cols = flux_layout(False)[key]
    if start is None:
        return KnownSVD.make(rows, cols, seed=seed, key=key)
    return KnownSVD.make(size, cols, seed=seed, key=f"{key}[{start}:{start + size}]")


def _flux_known_weight(key: str, shape, slices, seed: int):
    import torch

    if slices is None:
        return flux_known_svd(key, seed).matrix()
    w = torch.randn(shape, generator=host.seeded_generator(seed, key)) / math.sqrt(shape[1])
    for a, n in slices:
        w[a:a + n] = flux_known_svd(key, seed, a, n).matrix()
    return w


def build_mini_flux_pair(seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(dev, schnell)`` state dicts (module docstring): schnell holds the layers of
    :data:`FLUX_KNOWN` (float32), dev the same plus a 5 % perturbation; everything else is zero
    (bfloat16, the same tensors in both; norm scales one). Only dev has ``guidance_in``."""
    import torch

    dev_layout = flux_layout(True)
    zeros: dict[str, Any] = {}
    for key, shape in dev_layout.items():
        if key not in FLUX_KNOWN:
            zeros[key] = (torch.ones if key.endswith(".scale") else torch.zeros)(shape, dtype=torch.bfloat16)
    schnell_known = {key: _flux_known_weight(key, dev_layout[key], slices, seed) for key, slices in FLUX_KNOWN.items()}
    dev_known = host.fine_tune(schnell_known, seed=seed + 1, strength=0.05)
    schnell_layout = flux_layout(False)
    schnell = {k: v for k, v in zeros.items() if k in schnell_layout}
    schnell.update(schnell_known)
    dev = dict(zeros)
    dev.update(dev_known)
    return dev, schnell


def build_mini_sd3(seed: int = 0, **overrides) -> dict[str, Any]:
    """A random SD3 MMDiT state dict with ComfyUI's key names (float32; module docstring)."""
    import torch

    out: dict[str, Any] = {}
    for key, shape in sd3_layout(**overrides).items():
        if key == "pos_embed":
            out[key] = torch.randn(shape, generator=host.seeded_generator(seed, key)) * 0.02
        elif len(shape) >= 2:
            out[key] = host.power_law_matrix(shape[0], math.prod(shape[1:]), seed=seed, key=key).reshape(shape)
        else:
            out[key] = torch.randn(shape, generator=host.seeded_generator(seed, key)) * 0.01
    return out


# --------------------------------------------------------------------------------------------
# LoRAs in the layouts trainers write
# --------------------------------------------------------------------------------------------


def lora_factors(shape_of: Mapping[str, tuple[int, int]], rng, rank: int = 4, std: float = 0.05):
    """``{name: (up m×r, down r×n)}`` float32 N(0, std²) factors for ``{name: (m, n)}``."""
    import torch

    out = {}
    for name, (m, n) in shape_of.items():
        out[name] = (torch.from_numpy(rng.standard_normal((m, rank)) * std).float(),
                     torch.from_numpy(rng.standard_normal((rank, n)) * std).float())
    return out


def kohya_lora(factors: Mapping[str, tuple[Any, Any]], alpha: float) -> dict[str, Any]:
    """kohya layout: ``<module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` per module name
    (for Flux e.g. ``lora_unet_double_blocks_0_img_attn_qkv``: the whole fused weight)."""
    import torch

    out = {}
    for name, (up, down) in factors.items():
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def diffusers_lora(factors: Mapping[str, tuple[Any, Any]]) -> dict[str, Any]:
    """diffusers/PEFT layout: ``<module>.lora_B.weight`` (up) / ``.lora_A.weight`` (down), no alpha
    (scale 1), module names like ``transformer.transformer_blocks.0.attn.to_q`` (split q/k/v)."""
    out = {}
    for name, (up, down) in factors.items():
        out[f"{name}.lora_B.weight"] = up.contiguous()
        out[f"{name}.lora_A.weight"] = down.contiguous()
    return out


def kohya_name(model_key: str) -> str:
    """``double_blocks.0.img_attn.qkv.weight`` → ``lora_unet_double_blocks_0_img_attn_qkv``."""
    return "lora_unet_" + model_key[:-len(".weight")].replace(".", "_")
