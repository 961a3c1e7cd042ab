"""LoRA to LoRA-X on the real host: a planted LoRA converts losslessly and reloads; a generic one reports its loss.

The node decomposes through the Gram route, whose singular vectors the engine rounds to float16 (the
SVD cache's precision): against the float64 SVD the planted delta comes back within
reference.HALF_FACTOR_TOL (measured ~4e-4 on projected deltas; 1e-4 before), and "kept" is 1 within
the same bound (each Δσ_i = ũ_iᵀ ΔW ṽ_i moves by at most ~2·2⁻¹¹ relative).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import host
from reference import HALF_FACTOR_TOL, rel_err

LAYERS = [f"input_blocks.1.1.transformer_blocks.0.attn1.{p}.weight" for p in ("to_q", "to_k", "to_v")]


@pytest.fixture(scope="module")
def pack(comfy_host):
    comfy_host.load_pack(host.REPO_ROOT)
    return comfy_host.pack_module(host.REPO_ROOT)


def _convert_prompt(unet, lora, rank):
    return {
        "src": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": lora, "strength": 1.0}},
        "conv": {"class_type": "LoraxConvert", "inputs": {"model": ["src", 0], "adapter": ["load", 1], "rank": rank,
                                                          "filename_prefix": "lorax/converted"}},
        "handle": host.capture(["conv", 0]), "js": host.capture(["conv", 2]),
    }


def test_planted_lora_converts_losslessly_and_reloads(comfy_host, pack, mini_sd15, mini_sd15_unet_name):
    r = 16
    rng = np.random.default_rng(2)
    factors, refs = {}, {}
    for key in LAYERS:
        U, S, Vt = np.linalg.svd(mini_sd15[key].double().numpy(), full_matrices=False)
        d = rng.standard_normal(r) * 0.05
        refs[key] = (U[:, :r] * d) @ Vt[:r]
        factors[key] = (torch.from_numpy(U[:, :r] * d).float(), torch.from_numpy(Vt[:r]).float())
    lora = comfy_host.save_lora(host.make_kohya_lora(factors), "planted_as_lora.safetensors")
    out = comfy_host.run_prompt(_convert_prompt(mini_sd15_unet_name, lora, r))
    rows = json.loads(out["js"]["value"][0])
    assert len(rows) == 3 and all(row["kept"] > 1 - HALF_FACTOR_TOL and row["rank"] == r for row in rows)
    handle = out["handle"]["value"][0]
    assert handle.kind == "lorax" and handle.content.parameter_count == 3 * r
    assert "lowest 100.0 %" in out["conv"]["text"][0]
    # The saved file is found by LoRA-X Load and reproduces the planted delta.
    out = comfy_host.run_prompt({
        "src": {"class_type": "UNETLoader", "inputs": {"unet_name": mini_sd15_unet_name, "weight_dtype": "default"}},
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": handle.name, "strength": 1.0}},
        "m": host.capture(["load", 0]),
    })
    keys = ["diffusion_model." + k for k in LAYERS]
    patched = comfy_host.patched_weights(out["m"]["value"][0], keys)
    for key in LAYERS:
        assert rel_err(patched["diffusion_model." + key].double() - mini_sd15[key].double(), refs[key]) < HALF_FACTOR_TOL


def test_generic_lora_reports_loss_and_lorax_input_is_refused(comfy_host, pack, mini_sd15, mini_sd15_unet_name):
    g = torch.Generator().manual_seed(4)
    factors = {k: (torch.randn(mini_sd15[k].shape[0], 4, generator=g), torch.randn(4, mini_sd15[k].shape[1], generator=g))
               for k in LAYERS}
    lora = comfy_host.save_lora(host.make_kohya_lora(factors), "generic_for_convert.safetensors")
    out = comfy_host.run_prompt(_convert_prompt(mini_sd15_unet_name, lora, 32))
    rows = json.loads(out["js"]["value"][0])
    assert all(row["kept"] < 0.5 and abs(row["kept"] ** 2 + row["residual"] ** 2 - 1) < 1e-6 for row in rows)
    assert "what is not kept is lost" in out["conv"]["text"][0]
    name = out["handle"]["value"][0].name
    with pytest.raises(AssertionError) as e:
        comfy_host.run_prompt(_convert_prompt(mini_sd15_unet_name, name, 32))
    assert "already a LoRA-X adapter" in str(e.value)
