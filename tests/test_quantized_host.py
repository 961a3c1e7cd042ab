"""Quantized targets on the real host: the graph base → LoRA-X Load → LoRA-X Transfer onto a
quantized copy of the fine-tune → KSampler, against the same graph onto the full-precision file.

Three ways users load quantized weights, each made with real tools:

* ComfyUI's own quantized checkpoints (``_quantization_metadata`` + per-layer ``weight_scale``,
  fp8 e4m3fn — the format ComfyUI 0.3.75 reads through its stock loader into its
  ``QuantizedTensor``, and 0.33 converts to ``comfy_quant`` on load);
* legacy "scaled fp8" checkpoints (a ``scaled_fp8`` marker, per-layer ``scale_weight``);
* GGUF Q8_0 / Q4_0 weights (bytes from the ``gguf`` package; see tests/gguf_standin.py for why
  the tensor wrapper is ours in CI — by hand the real ComfyUI-GGUF loader runs the same checks,
  ``scripts/check-current-host``).

What must hold: the same verdict and the same per-layer decisions as with the full-precision
target (fp8 and Q8_0 move a weight by ~1–3 % of its norm; the fine-tune's layers score Φ̂ ≥ 0.9,
far from the 0.3 threshold); the transfer equals the transfer onto the *dequantized twin* (a
float32 file holding exactly what the host dequantizes) to 1e-5 relative (same float32 matrices;
see tests/test_weight_formats.py); and the sampler runs on the patched quantized model.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import host
from gguf_standin import gguf_model
from reference import rel_err

ATTN = [f"input_blocks.1.1.transformer_blocks.0.{a}.{p}.weight" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")]
LORA_KEYS = ATTN + ["output_blocks.2.1.transformer_blocks.0.ff.net.2.weight", "input_blocks.1.1.proj_in.weight"]
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def pack(comfy_host):
    comfy_host.load_pack(host.REPO_ROOT)
    return comfy_host.pack_module(host.REPO_ROOT)


@pytest.fixture(scope="module")
def target_sd(mini_sd15):
    return host.fine_tune(mini_sd15, seed=1, strength=0.05)


def _linear_keys(sd):
    """2-D weights of Linear layers (what ComfyUI's quantized ops quantize)."""
    return [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]


def _fp8(w: torch.Tensor):
    scale = w.abs().amax().float() / torch.finfo(FP8).max
    return (w.float() / scale).to(FP8), scale


@pytest.fixture(scope="module")
def quantized_files(comfy_host, target_sd):
    """Full-precision, ComfyUI-quantized fp8 and legacy scaled-fp8 copies of the fine-tune."""
    names = {"full": comfy_host.save_unet(target_sd, "q_target_full.safetensors")}
    comfy_q, legacy, layers = dict(target_sd), dict(target_sd), {}
    for key in _linear_keys(target_sd):
        q, scale = _fp8(target_sd[key])
        stem = key[:-len(".weight")]
        comfy_q[key], comfy_q[stem + ".weight_scale"] = q, scale
        legacy[key], legacy[stem + ".scale_weight"] = q, scale
        layers[stem] = {"format": "float8_e4m3fn"}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    names["comfy_fp8"] = comfy_host.save_unet(comfy_q, "q_target_comfy_fp8.safetensors", metadata=meta)
    legacy["scaled_fp8"] = torch.empty(0, dtype=FP8)
    names["scaled_fp8"] = comfy_host.save_unet(legacy, "q_target_scaled_fp8.safetensors")
    return names


@pytest.fixture(scope="module")
def lora_name(comfy_host, mini_sd15):
    g = torch.Generator().manual_seed(5)
    factors = {}
    for key in LORA_KEYS:
        w = mini_sd15[key]
        factors[key] = (torch.randn(w.shape[0], 4, generator=g) * 0.05,
                        torch.randn(4, w[0].numel(), generator=g).reshape(4, *w.shape[1:]) * 0.05)
    return comfy_host.save_lora(host.make_kohya_lora(factors, alpha=2.0), "q_style.safetensors")


def _graph(src, tgt, lora, **settings):
    inputs = {"source_model": ["src", 0], "target_model": ["tgt", 0], "adapter": ["load", 1], "strength": 1.0,
              "rank": 64, "threshold": 0.3, "mode": "prolora", "exact": False, **settings}
    p = host.unet_ksampler_prompt("unused", model_link=["transfer", 0], extra={
        "src": {"class_type": "UNETLoader", "inputs": {"unet_name": src, "weight_dtype": "default"}},
        "tgt": {"class_type": "UNETLoader", "inputs": {"unet_name": tgt, "weight_dtype": "default"}},
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": lora, "strength": 1.0}},
        "transfer": {"class_type": "LoraxTransfer", "inputs": inputs},
        "cap_tgt": host.capture(["tgt", 0]),
        "cap_handle": host.capture(["transfer", 2]),
    })
    del p["unet"]
    return p


def _decisions(handle):
    return {r["key"]: r["decision"] for r in handle.rows}


@pytest.fixture(scope="module")
def full_run(comfy_host, pack, mini_sd15_unet_name, quantized_files, lora_name):
    out = comfy_host.run_prompt(_graph(mini_sd15_unet_name, quantized_files["full"], lora_name))
    return out["cap_handle"]["value"][0]


def _check_quantized_target(comfy_host, pack, mini_sd15_unet_name, tgt_name, lora_name, full_run, target_sd,
                            tmp_path, label, expected_read=None):
    """Graph onto ``tgt_name``: KSampler runs, verdict and decisions as onto the full-precision
    file, the weights read as the host dequantizes them, transfer and saved file as the twin's."""
    out = comfy_host.run_prompt(_graph(mini_sd15_unet_name, tgt_name, lora_name))
    assert torch.isfinite(out["out"]["value"][0]["samples"]).all()  # KSampler ran on the patched quantized model
    handle, tgt = out["cap_handle"]["value"][0], out["cap_tgt"]["value"][0]
    assert handle.verdict == full_run.verdict and handle.verdict.startswith("Verdict: fits")
    assert _decisions(handle) == _decisions(full_run)
    assert set(handle.result.deltas) == {"diffusion_model." + k for k in LORA_KEYS}

    # The host stored the layers quantized, and the pack read them as the host dequantizes them.
    weights = pack.nodes.bridge.PatcherWeights(tgt)
    key = "diffusion_model." + ATTN[0]
    stored = weights.stored(key)
    assert stored.element_size() == 1 or "Quantized" in type(stored).__name__, type(stored)
    if expected_read is not None:
        assert rel_err(weights.weight(key).double(), expected_read.double()) <= 1e-6

    # Equal to the transfer onto the dequantized twin (what the host computes with, as float32).
    twin = {k[len("diffusion_model."):]: weights.weight(k).float().clone()
            for k in weights.keys() if weights.shape(k) is not None and len(weights.shape(k)) >= 2}
    twin = {**target_sd, **twin}
    twin_name = comfy_host.save_unet(twin, f"q_twin_{label}.safetensors")
    twin_handle = comfy_host.run_prompt(_graph(mini_sd15_unet_name, twin_name, lora_name))["cap_handle"]["value"][0]
    assert _decisions(twin_handle) == _decisions(handle)
    for k, d in handle.result.deltas.items():
        assert rel_err(d.matrix().double(), twin_handle.result.deltas[k].matrix().double()) <= 1e-5, k

    # LoRA-X Save writes the twin's file (same keys, same values to 1e-5).
    a, b = tmp_path / "q.safetensors", tmp_path / "twin.safetensors"
    pack.nodes.transfer_job.save_transfer(handle, a)
    pack.nodes.transfer_job.save_transfer(twin_handle, b)
    from safetensors.torch import load_file

    fa, fb = load_file(a), load_file(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if k.endswith("lora_up.weight"):
            down = k.replace("lora_up", "lora_down")
            assert rel_err((fa[k].double().flatten(1) @ fa[down].double().flatten(1)),
                           (fb[k].double().flatten(1) @ fb[down].double().flatten(1))) <= 1e-5, k
    return handle


@pytest.mark.parametrize("kind", ["comfy_fp8", "scaled_fp8"])
def test_quantized_checkpoint_gives_the_same_verdict_decisions_and_samples(
        comfy_host, pack, mini_sd15_unet_name, quantized_files, lora_name, full_run, target_sd, kind, tmp_path):
    q, scale = _fp8(target_sd[ATTN[0]])
    handle = _check_quantized_target(comfy_host, pack, mini_sd15_unet_name, quantized_files[kind], lora_name,
                                     full_run, target_sd, tmp_path, kind, expected_read=q.float() * scale)
    if kind == "comfy_fp8":  # the report says how the target was stored and read
        # (0.3.75 names the layout TensorCoreFP8Layout, 0.33 TensorCoreFP8E4M3Layout)
        assert re.search(r"target weights stored quantized \(QuantizedTensor \(TensorCoreFP8\w*Layout\): 7 layers\)",
                         handle.report), handle.report


#: ComfyUI ``comfy_quant`` formats (0.33) and the comfy-kitchen layouts that make them.
COMFY_QUANT = {"float8_e4m3fn": "TensorCoreFP8Layout", "int8_tensorwise": "TensorWiseINT8Layout",
               "nvfp4": "TensorCoreNVFP4Layout", "mxfp8": "TensorCoreMXFP8Layout"}


@pytest.mark.current_host
@pytest.mark.parametrize("fmt", list(COMFY_QUANT))
def test_comfy_quant_layouts_through_the_stock_loader(comfy_host, pack, mini_sd15_unet_name, lora_name, full_run,
                                                      target_sd, fmt, tmp_path):
    """Checkpoints in the per-layer ``comfy_quant`` format of current ComfyUI (0.33), every layout it
    loads that comfy-kitchen makes on a CPU, through the stock UNETLoader. 0.3.75 (CI) predates the
    format, so this runs by hand: ``scripts/check-current-host`` selects the ``current_host`` marker."""
    import comfy_kitchen.tensor as ck

    sd = dict(target_sd)
    for key in _linear_keys(target_sd):
        if fmt == "nvfp4" and ".attn2.to_" in key and key.endswith(("to_k.weight", "to_v.weight")):
            # SD1.5 detection reads the text width from attn2.to_k's input side, which NVFP4's
            # packed storage halves (0.33 then fails in model_config_from_unet); NVFP4 checkpoints
            # in the wild (Flux, Qwen-Image) are detected from other keys.
            continue
        stem = key[:-len(".weight")]
        tensors = ck.QuantizedTensor.from_float(target_sd[key].to(torch.bfloat16), COMFY_QUANT[fmt]).state_dict("w")
        sd[key] = tensors.pop("w")
        sd[stem + ".weight_scale"] = tensors.pop("w_scale")
        if "w_scale_2" in tensors:
            sd[stem + ".weight_scale_2"] = tensors.pop("w_scale_2")
        assert not tensors, tensors
        sd[stem + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    name = comfy_host.save_unet(sd, f"q_target_{fmt}.safetensors")
    handle = _check_quantized_target(comfy_host, pack, mini_sd15_unet_name, name, lora_name, full_run, target_sd,
                                     tmp_path, fmt)
    assert re.search(r"target weights stored quantized \(QuantizedTensor \(\w+Layout\): [57] layers\)",
                     handle.report), handle.report


def _real_gguf_pack():
    """A ComfyUI-GGUF checkout to test against instead of the CI stand-in (set by hand)."""
    import os

    return os.environ.get("LORAX_COMFYUI_GGUF") or None


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_target_gives_the_same_verdict_and_decisions(comfy_host, pack, mini_sd15_unet_name, quantized_files,
                                                          lora_name, full_run, target_sd, qtype, tmp_path):
    """A target whose Linear weights are GGUF tensors (packed bytes, as ComfyUI-GGUF loads them),
    through the same job the LoRA-X Transfer node runs: same verdict, same decisions as onto the
    full-precision target, the deltas (and the saved file) of the transfer onto the dequantized twin.

    With ``LORAX_COMFYUI_GGUF`` pointing at a ComfyUI-GGUF checkout (by hand; CI cannot reach
    it), the target is a GGUF file written by the ``gguf`` package and the graph is the user's:
    that pack's own *Unet Loader (GGUF)* → LoRA-X Transfer → KSampler, sampling from the patched
    GGUF model through the pack's own patcher."""
    import comfy.utils
    import gguf
    from safetensors.torch import load_file

    from gguf_standin import write_gguf
    from lorax.transfer import TransferSettings

    real = _real_gguf_pack()
    job, runtime = pack.nodes.transfer_job, pack.nodes.runtime
    settings = TransferSettings(rank=64, threshold=0.3, mode="prolora")
    out = comfy_host.run_prompt({
        "src": {"class_type": "UNETLoader", "inputs": {"unet_name": mini_sd15_unet_name, "weight_dtype": "default"}},
        "tgt": {"class_type": "UNETLoader", "inputs": {"unet_name": quantized_files["full"], "weight_dtype": "default"}},
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": lora_name, "strength": 1.0}},
        "a": host.capture(["src", 0]), "b": host.capture(["tgt", 0]), "c": host.capture(["load", 1]),
    })
    src, full, adapter = (out[k]["value"][0] for k in "abc")
    if real:
        comfy_host.load_pack(real)
        name = f"q_target_{qtype}.gguf"
        write_gguf(comfy_host.folders["diffusion_models"] / name, target_sd, gguf.GGMLQuantizationType[qtype])
        graph = _graph(mini_sd15_unet_name, quantized_files["full"], lora_name)
        graph["tgt"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}}
        run = comfy_host.run_prompt(graph)
        assert torch.isfinite(run["out"]["value"][0]["samples"]).all()  # KSampler on the patched GGUF model
        handle, quantized = run["cap_handle"]["value"][0], run["cap_tgt"]["value"][0]
        assert type(quantized).__name__ == "GGUFModelPatcher"
        replaced = [k for k, _ in quantized.model.named_parameters()
                    if getattr(comfy.utils.get_attr(quantized.model, k), "tensor_type", None)
                    not in (None, gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)]
    else:
        path = comfy_host.folders["diffusion_models"] / quantized_files["full"]
        quantized, replaced = gguf_model(path, gguf.GGMLQuantizationType[qtype])
        handle = job.run_transfer(src, quantized, adapter, settings, runtime.get_engine())
    assert {"diffusion_model." + k for k in ATTN} <= set(replaced)
    assert handle.verdict == full_run.verdict
    assert _decisions(handle) == _decisions(full_run)
    assert f"target weights stored quantized (GGUF {qtype}: 7 layers)" in handle.report
    # the shapes the report saw are the logical ones, not the packed bytes'
    rows = {r["key"]: r for r in handle.rows}
    assert rows["diffusion_model." + ATTN[0]]["shape_target"] == list(target_sd[ATTN[0]].shape)
    # the twin: the dequantized matrices in a plain float32 file, loaded by the stock loader
    weights = pack.nodes.bridge.PatcherWeights(quantized)
    twin_sd = {**target_sd, **{k[len("diffusion_model."):]: weights.weight(k).float().clone() for k in replaced}}
    twin_name = comfy_host.save_unet(twin_sd, f"q_twin_gguf_{qtype}.safetensors")
    twin = comfy_host.run_prompt({
        "t": {"class_type": "UNETLoader", "inputs": {"unet_name": twin_name, "weight_dtype": "default"}},
        "c": host.capture(["t", 0])})["c"]["value"][0]
    twin_handle = job.run_transfer(src, twin, adapter, settings, runtime.get_engine())
    for k, d in handle.result.deltas.items():
        assert rel_err(d.matrix().double(), twin_handle.result.deltas[k].matrix().double()) <= 1e-5, k
    a, b = tmp_path / "q.safetensors", tmp_path / "twin.safetensors"
    job.save_transfer(handle, a)
    job.save_transfer(twin_handle, b)
    fa, fb = load_file(a), load_file(b)
    assert fa.keys() == fb.keys()
    for k in (k for k in fa if k.endswith("lora_up.weight")):
        down = k.replace("lora_up", "lora_down")
        assert rel_err(fa[k].double().flatten(1) @ fa[down].double().flatten(1),
                       fb[k].double().flatten(1) @ fb[down].double().flatten(1)) <= 1e-5, k
    # the input model was not touched: still full precision
    assert full.model.state_dict()["diffusion_model." + ATTN[0]].dtype == torch.float32
