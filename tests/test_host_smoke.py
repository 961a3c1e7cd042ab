"""The real ComfyUI host works: model detection, a sampled graph through
PromptExecutor, the checkpoint loader, and the stock LoRA loader's exact arithmetic."""

from __future__ import annotations

import pytest
import torch

import host

LORA_KEY = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


def _unet_only(name):
    return {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}}


def test_mini_sd15_is_detected_as_sd15(comfy_host, mini_sd15, mini_sd15_unet_name):
    assert 100e6 < host.count_params(mini_sd15) < 115e6
    out = comfy_host.run_prompt({**_unet_only(mini_sd15_unet_name), "m": host.capture(["unet", 0])})
    model = out["m"]["value"][0]
    assert type(model).__name__ == "ModelPatcher"
    assert type(model.model.model_config).__name__ == "SD15"
    # The synthetic layout is exactly what ComfyUI builds for the detected config.
    loaded = model.model.diffusion_model.state_dict()
    assert set(loaded) == set(mini_sd15)
    for k, v in mini_sd15.items():
        assert loaded[k].shape == v.shape, k
    assert loaded[LORA_KEY].dtype == torch.float32
    assert torch.equal(loaded[LORA_KEY], mini_sd15[LORA_KEY])


def test_unet_ksampler_graph_runs(comfy_host, mini_sd15_unet_name):
    out = comfy_host.run_prompt(host.unet_ksampler_prompt(mini_sd15_unet_name, seed=1))
    latent = out["out"]["value"][0]["samples"]
    assert latent.shape == (1, 4, 8, 8)
    assert torch.isfinite(latent).all()
    assert latent.abs().max() > 0


def test_checkpoint_loader_accepts_unet_only_checkpoint(comfy_host, mini_sd15_ckpt_name):
    p = host.unet_ksampler_prompt("unused", extra={
        "unet": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": mini_sd15_ckpt_name}},
        "m": host.capture(["unet", 0]),
        "clip": host.capture(["unet", 1]),
    })
    out = comfy_host.run_prompt(p)
    assert type(out["m"]["value"][0].model.model_config).__name__ == "SD15"
    assert out["clip"]["value"] == [None]  # no text encoder in the file
    assert torch.isfinite(out["out"]["value"][0]["samples"]).all()


def test_execution_errors_carry_comfy_message(comfy_host):
    with pytest.raises(AssertionError, match="UNETLoader|not in list|does_not_exist"):
        comfy_host.run_prompt({**_unet_only("does_not_exist.safetensors"), "m": host.capture(["unet", 0])})


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_stock_lora_loader_applies_exact_delta(comfy_host, mini_sd15, mini_sd15_unet_name, strength):
    rank, alpha = 4, 2.0
    w = mini_sd15[LORA_KEY]
    g = torch.Generator().manual_seed(123)
    up = torch.randn(w.shape[0], rank, generator=g) * 0.05
    down = torch.randn(rank, w.shape[1], generator=g) * 0.05
    lora_name = comfy_host.save_lora(host.make_kohya_lora({LORA_KEY: (up, down)}, alpha=alpha), "smoke_lora.safetensors")
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight" in \
        host.make_kohya_lora({LORA_KEY: (up, down)})

    out = comfy_host.run_prompt({
        **_unet_only(mini_sd15_unet_name),
        "lora": {"class_type": "LoraLoaderModelOnly",
                 "inputs": {"model": ["unet", 0], "lora_name": lora_name, "strength_model": strength}},
        "base": host.capture(["unet", 0]),
        "patched": host.capture(["lora", 0]),
    })
    base, patched = out["base"]["value"][0], out["patched"]["value"][0]
    full_key = "diffusion_model." + LORA_KEY
    assert set(patched.patches) == {full_key}
    assert not base.patches

    weights = comfy_host.patched_weights(patched)
    expected = (w.double() + (up.double() @ down.double()) * (alpha / rank) * strength).float()
    torch.testing.assert_close(weights[full_key], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    for k, v in mini_sd15.items():
        if k != LORA_KEY:
            assert torch.equal(weights["diffusion_model." + k], v), k

    # The input model is untouched, both as ComfyUI would patch it and in memory.
    base_weights = comfy_host.patched_weights(base, [full_key])
    assert torch.equal(base_weights[full_key], w)
    assert torch.equal(base.model.diffusion_model.state_dict()[LORA_KEY], w)
    assert torch.equal(patched.model.diffusion_model.state_dict()[LORA_KEY], w)  # unpatched again


def test_execution_failure_reports_node_and_message(comfy_host, mini_sd15_unet_name):
    # A conditioning of the wrong width makes the UNet's cross-attention fail inside KSampler.
    p = host.unet_ksampler_prompt(mini_sd15_unet_name, extra={"pos": host.zero_cond(context_dim=100)})
    with pytest.raises(host.ComfyExecutionError) as ei:
        comfy_host.run_prompt(p)
    msg = str(ei.value)
    assert "KSampler" in msg and "sampler" in msg
    assert ei.value.details.get("exception_message")


def test_reduced_depth_variant_loads_and_samples(comfy_host, mini_sd15):
    sd = host.build_mini_sd15_unet(0, channel_mult=(1,))
    assert not any(k.startswith("input_blocks.2.") for k in sd)
    assert host.count_params(sd) < 0.5 * host.count_params(mini_sd15)
    # Tensors the variants share are identical (generated per key).
    assert torch.equal(sd[LORA_KEY], mini_sd15[LORA_KEY])
    name = comfy_host.save_unet(sd, "mini_sd15_depth1.safetensors")
    out = comfy_host.run_prompt({**host.unet_ksampler_prompt(name), "m": host.capture(["unet", 0])})
    assert type(out["m"]["value"][0].model.model_config).__name__ == "SD15"
    assert torch.isfinite(out["out"]["value"][0]["samples"]).all()


def test_fine_tune_is_a_relative_perturbation(mini_sd15):
    keys = [LORA_KEY, "input_blocks.1.0.in_layers.2.weight", "out.0.weight"]
    sub = {k: mini_sd15[k] for k in keys}
    before = {k: v.clone() for k, v in sub.items()}
    ft = host.fine_tune(sub, seed=5, strength=0.05)
    for k in keys:
        assert torch.equal(sub[k], before[k])  # input untouched
        assert ft[k].shape == sub[k].shape and ft[k].dtype == sub[k].dtype
    for k in keys[:2]:
        rel = (ft[k] - sub[k]).norm() / sub[k].norm()
        assert abs(float(rel) - 0.05) < 1e-3
    assert torch.equal(host.fine_tune(sub, seed=5, strength=0.05)[LORA_KEY], ft[LORA_KEY])
    assert not torch.equal(host.fine_tune(sub, seed=6, strength=0.05)[LORA_KEY], ft[LORA_KEY])


def test_power_law_spectrum():
    w = host.power_law_matrix(96, 64, seed=1, key="k", decay=0.8)
    s = torch.linalg.svdvals(w.double())
    i = torch.arange(1, 65, dtype=torch.float64)
    torch.testing.assert_close(s / s[0], i.pow(-0.8), rtol=1e-4, atol=1e-6)
    assert abs(float(w.norm()) - 96 ** 0.5) < 1e-3
