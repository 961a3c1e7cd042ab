"""DiT models on the real host: Flux (dev → schnell) and SD3, fused weights and their slices,
report families named by the models' own blocks, and the compatibility verdict; then the families
people run now (tests/dit_families.py: Wan, HunyuanVideo, LTX-Video, Qwen-Image, Z-Image, Chroma),
one parametrised test over them, and layers that match by name but differ in shape (Flux.1 →
Flux.2, the paired rule across widths, the command line's exit 2).

Models (tests/dit_models.py) are loaded with ComfyUI's UNETLoader, so its model detection decides
what they are; LoRAs are written in the layouts trainers use (kohya-Flux: whole fused modules,
``lora_unet_double_blocks_0_img_attn_qkv``; diffusers: split ``…attn.add_q_proj`` / ``proj_mlp``)
and parsed by ComfyUI's own key maps.

References and tolerances:

* Flux is full width (3072; detection allows nothing else), so its float64 reference uses the
  closed-form SVD of the target layers (``KnownSVD``) instead of decomposing them:
  ``U_k U_kᵀ ΔW V_k V_kᵀ`` in dense float64 numpy. The library sees the weights as stored (float32,
  built by a float32 inverse DCT: entry errors ~1e-7 relative) and returns float32 factors; at
  k = 64 the spectral gap of sᵢ ∝ i^-0.8 (≈ 1.2 % of s₆₄) keeps that rounding from tilting the
  basis by more than ~1e-6 (Davis–Kahan). Measured: 5–6e-7 on every layer and slice with float32
  factors; the engine now rounds U and V to float16 (the SVD cache's precision, ~4e-4 on projected
  deltas), hence reference.HALF_FACTOR_TOL (1e-5 before).
* SD3 is small: its reference is ``numpy.linalg.svd`` of the target slice or weight; float16
  vectors, hence HALF_FACTOR_TOL.
* Patched weights: ``fl(W + Δ)`` in float32 differs from ``W + Δ`` by ≤ 2⁻²⁴·|W + Δ| per entry, so
  ``‖patched − W − Δ‖_F ≤ 1e-6·‖W‖_F``; rows no module touches must be bit-identical.

One file although over 600 lines: the tests share the module-scoped models (the mini Flux pair and
SD3, saved once and loaded once by one executor) and the seed that made them; split, each file
would build and load them again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import dit_families as df
import dit_models as dm
import host
from lorax.fused import WeightSlice
from lorax.report import block_of, block_sort_key, family_of
from lorax.safetensors_io import load_tensors, read_metadata
from reference import HALF_FACTOR_TOL, fresh_seed, lorax_ref, lorax_ref_wide, rel_err, top_svd

H = dm.HIDDEN
RANK = 64          # k for Flux: see the module docstring
SD3_RANK = 16      # k for the 128-wide SD3 layers
P = "diffusion_model."


@pytest.fixture(scope="module")
def pack(comfy_host):
    comfy_host.load_pack(host.REPO_ROOT)
    return comfy_host.pack_module(host.REPO_ROOT)


@pytest.fixture(scope="module")
def seed():
    s = fresh_seed()
    print(f"LORAX_TEST_SEED={s} (models and LoRAs of tests/test_dit_models.py)")
    return s


@pytest.fixture(scope="module")
def models(comfy_host, seed):
    """The mini Flux dev/schnell and SD3 files, and one executor so ComfyUI loads each once."""
    dev, schnell = dm.build_mini_flux_pair(seed)
    names = types.SimpleNamespace(dev=comfy_host.save_unet(dev, "mini_flux_dev.safetensors"),
                                  schnell=comfy_host.save_unet(schnell, "mini_flux_schnell.safetensors"))
    del dev, schnell
    sd3 = dm.build_mini_sd3(seed)
    sd3_ft = host.fine_tune(sd3, seed=seed + 1, strength=0.05)
    names.sd3, names.sd3_ft = sd3, sd3_ft
    names.sd3_src = comfy_host.save_unet(sd3, "mini_sd3.safetensors")
    names.sd3_tgt = comfy_host.save_unet(sd3_ft, "mini_sd3_finetune.safetensors")
    names.sd3_other = comfy_host.save_unet(dm.build_mini_sd3(seed + 99), "mini_sd3_unrelated.safetensors")
    names.seed = seed
    names.executor = comfy_host.new_executor()
    yield names
    comfy_host.unload_all()


def core(verdict: str) -> str:
    """The verdict without the clauses on how the layers were moved, what they keep and what the stock
    loader would do (lorax.verdict; checked by tests/test_nodes.py and tests/test_scan_batch.py)."""
    out = re.sub(r" and are moved \([^;]*?\)(?=[;.])", "", verdict)
    out = re.sub(r"; kept \(median\) \d+ % of each delta's norm, cosine -?[0-9.]+(?=[;.])", "", out)
    out = re.sub(r" The stock LoRA loader would apply [^.]*\.", "", out)
    assert verdict.count("The stock LoRA loader") <= 1
    return out


def _rng(seed, salt):
    return np.random.default_rng([seed, salt])


def _loader(name, dtype="default"):
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": dtype}}


def _transfer_graph(src, tgt, lora, *, rank, threshold=0.3, dtype="default", save=None, shape_rule=None):
    p = {
        "src": _loader(src, dtype), "tgt": _loader(tgt, dtype),
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": lora, "strength": 1.0}},
        "transfer": {"class_type": "LoraxTransfer", "inputs": {
            "source_model": ["src", 0], "target_model": ["tgt", 0], "adapter": ["load", 1], "strength": 1.0,
            "rank": rank, "threshold": threshold, "mode": "lorax", "exact": False,
            **({"shape_rule": shape_rule} if shape_rule else {})}},
        "cap_src": host.capture(["src", 0]), "cap_tgt": host.capture(["tgt", 0]),
        "cap_model": host.capture(["transfer", 0]), "cap_handle": host.capture(["transfer", 2]),
        "cap_json": host.capture(["transfer", 5]),
    }
    if save:
        p["save"] = {"class_type": "LoraxSave", "inputs": {"transfer": ["transfer", 2], "filename_prefix": save,
                                                           "bake_strength": True}}
        p["cap_path"] = host.capture(["save", 0])
    return p


def _run(comfy_host, models, prompt):
    """Run on the shared executor; returns ``(outputs, {capture id: captured value})``. ComfyUI does
    not run an output node again whose inputs it has cached (nor report it in the history), so a
    capture it skipped is read from the executor's cache, where its output of the last run is."""
    out = comfy_host.run_prompt(prompt, executor=models.executor)
    cap = {}
    for nid in prompt:
        if nid.startswith("cap_"):
            ui = out[nid] if nid in out else models.executor.caches.outputs.get(nid).ui["output"]
            cap[nid] = ui["value"][0]
    return out, cap


def _weight(patcher, key):
    return patcher.model.state_dict()[key]


def _check_patched(patched, base, deltas):
    """``deltas``: {row range or None: expected float64 delta}; every other row bit-identical."""
    touched = torch.zeros(base.shape[0], dtype=torch.bool)
    for rows, delta in deltas.items():
        a, b = rows if rows is not None else (0, base.shape[0])
        err = (patched[a:b].double() - base[a:b].double() - torch.as_tensor(delta)).norm()
        assert float(err) <= 1e-6 * float(base.double().norm()), (rows, float(err))
        touched[a:b] = True
    assert torch.equal(patched[~touched], base[~touched])


# --------------------------------------------------------------------------------------------
# The models: ComfyUI's own detection
# --------------------------------------------------------------------------------------------

def test_mini_models_are_detected_as_flux_schnell_and_sd3(comfy_host, pack, models):
    _, cap = _run(comfy_host, models, {
        "dev": _loader(models.dev), "schnell": _loader(models.schnell), "sd3": _loader(models.sd3_src),
        "cap_dev": host.capture(["dev", 0]), "cap_schnell": host.capture(["schnell", 0]),
        "cap_sd3": host.capture(["sd3", 0])})
    kind = pack.nodes.bridge.model_kind
    assert (kind(cap["cap_dev"]), kind(cap["cap_schnell"]), kind(cap["cap_sd3"])) == ("Flux", "FluxSchnell", "SD3")
    for patcher, layout in ((cap["cap_dev"], dm.flux_layout(True)), (cap["cap_schnell"], dm.flux_layout(False)),
                            (cap["cap_sd3"], dm.sd3_layout())):
        assert {k[len(P):] for k in patcher.model.state_dict() if k.startswith(P)} == set(layout)
    cfg = cap["cap_dev"].model.model_config.unet_config
    assert (cfg["hidden_size"], cfg["depth"], cfg["depth_single_blocks"]) == (H, 1, 1)


def test_every_flux1_and_sd3_layer_is_named_by_its_own_block_and_family():
    """The full Flux.1 (19 double, 38 single blocks) and SD3-medium (24 joint blocks) layouts, from
    ComfyUI's classes on the meta device: every matrix of a block gets one of the block's families."""
    flux = {P + k: s for k, s in dm.flux_layout(True, depth=19, depth_single_blocks=38, context_in_dim=4096,
                                                 vec_in_dim=768).items() if len(s) == 2}
    families: dict[str, set] = {}
    for key in flux:
        families.setdefault(block_of(key).split(".")[0], set()).add(family_of(key))
    assert families["double_blocks"] == {"img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod",
                                         "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod"}
    assert families["single_blocks"] == {"linear1", "linear2", "modulation"}
    blocks = sorted({block_of(k) for k in flux}, key=block_sort_key)
    assert blocks == (["guidance_in", "img_in", "time_in", "txt_in", "vector_in"] + [f"double_blocks.{i}" for i in range(19)]
                      + [f"single_blocks.{i}" for i in range(38)] + ["final_layer"])
    in_blocks = sum(s[0] * s[1] for k, s in flux.items() if "_blocks." in k)
    assert 11.8e9 < in_blocks < 12.0e9  # the "12 B" of Flux.1
    sd3 = {P + k for k, s in dm.sd3_layout(depth=24).items() if len(s) == 2 and "joint_blocks" in k}
    assert {family_of(k) for k in sd3} == {
        f"{stream}.{f}" for stream in ("x_block", "context_block")
        for f in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation")} | {"x_block.attn2.qkv",
                                                                                       "x_block.attn2.proj"}


# --------------------------------------------------------------------------------------------
# Flux dev → schnell
# --------------------------------------------------------------------------------------------

FLUX_KOHYA = {"double_blocks.0.img_attn.qkv.weight": 2.0, "single_blocks.0.modulation.lin.weight": 4.0}  # → alpha
FLUX_SPLIT = {  # diffusers module → (fused weight, rows)
    "transformer.transformer_blocks.0.attn.add_q_proj": ("double_blocks.0.txt_attn.qkv.weight", (0, H)),
    "transformer.transformer_blocks.0.attn.add_k_proj": ("double_blocks.0.txt_attn.qkv.weight", (H, H)),
    "transformer.single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1.weight", (3 * H, 4 * H)),
}


def test_kohya_flux_lora_moves_dev_to_schnell_like_the_float64_reference(comfy_host, pack, models):
    layout = dm.flux_layout(False)
    factors = dm.lora_factors({dm.kohya_name(k): layout[k] for k in FLUX_KOHYA}, _rng(models.seed, 1))
    lora = {}
    for key, alpha in FLUX_KOHYA.items():
        lora.update(dm.kohya_lora({dm.kohya_name(key): factors[dm.kohya_name(key)]}, alpha))
    name = comfy_host.save_lora(lora, "flux_kohya_fused.safetensors")
    out, cap = _run(comfy_host, models, _transfer_graph(models.dev, models.schnell, name, rank=RANK))
    handle = cap["cap_handle"]
    assert handle.title.endswith("Flux → FluxSchnell, mode lorax")
    keys = [P + k for k in FLUX_KOHYA]
    assert [r["key"] for r in json.loads(cap["cap_json"])] == keys
    assert {l.decision.value for l in handle.result.layers} == {"transferred"}
    patched = comfy_host.patched_weights(cap["cap_model"], keys)
    for key, alpha in FLUX_KOHYA.items():
        up, down = factors[dm.kohya_name(key)]
        delta = up.double().numpy() @ down.double().numpy() * (alpha / up.shape[1])
        U, _, V = dm.flux_known_svd(key, models.seed).top(RANK)
        ref = lorax_ref_wide(delta, U, V)
        err = rel_err(handle.result.deltas[P + key].matrix(), ref)
        print(f"{key}: relative error vs the closed-form float64 reference {err:.1e}")
        assert err < HALF_FACTOR_TOL, key
        _check_patched(patched[P + key], _weight(cap["cap_tgt"], P + key),
                       {None: handle.result.deltas[P + key].matrix().double()})
    # The report names Flux's own blocks and families; the verdict comes first.
    lines = handle.report.split("\n")
    assert lines[1] == handle.verdict and core(handle.verdict) == ("Verdict: fits — all 2 adapter modules map onto layers of this FluxSchnell "
                                          "model; 2 of 2 mapped layers (100 %) pass the similarity threshold (Φ̂ ≥ 0.3).")
    payload = out["transfer"]["lorax_report"][0]
    assert payload["verdict"] == handle.verdict
    assert [(b["name"], b["label"], [f[0] for f in b["families"]]) for b in payload["blocks"]] == [
        ("double_blocks.0", "dbl 0", ["img_attn.qkv"]), ("single_blocks.0", "sgl 0", ["modulation"])]
    # Inputs untouched.
    assert not cap["cap_src"].patches and not cap["cap_tgt"].patches


def test_diffusers_split_flux_lora_is_moved_slice_by_slice(comfy_host, pack, models):
    """q and k of txt_attn.qkv and the MLP rows of linear1: each slice decomposed, compared and
    projected on its own, patched into its rows; v, and linear1's q/k/v, stay bit-identical; the
    saved file merges the slices into the fused modules and loads in ComfyUI's stock loader."""
    shapes = {m: (rows[1], H) for m, (_, rows) in FLUX_SPLIT.items()}
    factors = dm.lora_factors(shapes, _rng(models.seed, 2))
    name = comfy_host.save_lora(dm.diffusers_lora(factors), "flux_diffusers_split.safetensors")
    out, cap = _run(comfy_host, models, _transfer_graph(models.dev, models.schnell, name, rank=RANK,
                                                        save="lorax/flux_split"))
    handle = cap["cap_handle"]
    slices = {m: WeightSlice(P + key, 0, *rows) for m, (key, rows) in FLUX_SPLIT.items()}
    assert set(handle.result.deltas) == {s.name for s in slices.values()}
    expected = {}
    for module, (key, (start, size)) in FLUX_SPLIT.items():
        up, down = factors[module]
        U, _, V = dm.flux_known_svd(key, models.seed, start, size).top(RANK)
        ref = lorax_ref_wide(up.double().numpy() @ down.double().numpy(), U, V)
        moved = handle.result.deltas[slices[module].name].matrix().double()
        err = rel_err(moved, ref)
        print(f"{slices[module].name}: relative error vs the closed-form float64 reference {err:.1e}")
        assert err < HALF_FACTOR_TOL, module
        expected.setdefault(P + key, {})[(start, start + size)] = moved
    patched = comfy_host.patched_weights(cap["cap_model"], list(expected))
    for key, parts in expected.items():
        _check_patched(patched[key], _weight(cap["cap_tgt"], key), parts)
    # Report: slice families, the note, the verdict.
    rows = json.loads(cap["cap_json"])
    fams = {family_of(r["key"]) for r in rows}
    assert fams == {"txt_attn.qkv[q]", "txt_attn.qkv[k]", "linear1[mlp]"}
    assert {r["fused"] for r in rows} == set(expected)
    assert "3 layers are slices of fused weights" in handle.report
    assert handle.verdict.startswith("Verdict: fits — all 3 adapter modules map onto layers of this FluxSchnell")
    # Saved: whole kohya modules, slices merged; the stock loader reproduces the transfer exactly.
    path = cap["cap_path"]
    tensors = load_tensors(path)
    assert set(tensors) == {f"{m}.{s}" for m in ("lora_unet_double_blocks_0_txt_attn_qkv",
                                                 "lora_unet_single_blocks_0_linear1")
                            for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert tensors["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"].shape == (3 * H, 2 * 4)
    assert read_metadata(path)["ss_base_model_version"] == "flux1"
    stock = comfy_host.run_prompt({
        "tgt": _loader(models.schnell),
        "stock": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["tgt", 0], "strength_model": 1.0,
                                                                  "lora_name": path.split("/loras/")[-1]}},
        "cap": host.capture(["stock", 0])}, executor=models.executor)
    again = comfy_host.patched_weights(stock["cap"]["value"][0], list(expected))
    for key, parts in expected.items():
        _check_patched(again[key], _weight(cap["cap_tgt"], key), parts)


def _sd15_lora_layout(unet) -> dict[str, tuple[int, int]]:
    """kohya module names and (out, in) of every attention and feed-forward layer of an SD1.5 UNet."""
    return {host.kohya_lora_prefix(k): tuple(w.shape) for k, w in unet.items()
            if "transformer_blocks" in k and k.endswith(".weight") and w.dim() == 2}


def test_an_sd15_lora_on_flux_gets_one_sentence_not_a_warning_per_key(comfy_host, pack, models, mini_sd15, caplog):
    rng = _rng(models.seed, 3)
    shapes = _sd15_lora_layout(mini_sd15)
    lora = dm.kohya_lora(dm.lora_factors(shapes, rng, rank=2), alpha=2.0)
    name = comfy_host.save_lora(lora, "sd15_style.safetensors")
    prompt = _transfer_graph(models.dev, models.schnell, name, rank=RANK)
    with caplog.at_level(logging.WARNING), pytest.raises(host.ComfyExecutionError) as e:
        comfy_host.run_prompt(prompt, executor=models.executor)
    verdict = (f"Verdict: does not fit — none of the adapter's {len(shapes)} modules matches a layer of this Flux model: "
               "it was made for another architecture (its module names say SD1.x). Nothing was transferred; connect "
               "a source model of the adapter's own architecture.")
    assert e.value.details["node_type"] == "LoraxLoad"  # the first node that sees the adapter, before any SVD
    assert e.value.details["exception_message"].strip().endswith(verdict)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(shapes) >= 30


# --------------------------------------------------------------------------------------------
# SD3 (MMDiT)
# --------------------------------------------------------------------------------------------

SD3_SPLIT = {  # diffusers module → (weight, rows or None)
    "transformer.transformer_blocks.0.attn.to_q": ("joint_blocks.0.x_block.attn.qkv.weight", (0, 128)),
    "transformer.transformer_blocks.0.attn.to_k": ("joint_blocks.0.x_block.attn.qkv.weight", (128, 128)),
    "transformer.transformer_blocks.0.attn.to_v": ("joint_blocks.0.x_block.attn.qkv.weight", (256, 128)),
    "transformer.transformer_blocks.0.attn.add_k_proj": ("joint_blocks.0.context_block.attn.qkv.weight", (128, 128)),
    "transformer.transformer_blocks.0.attn2.to_v": ("joint_blocks.0.x_block.attn2.qkv.weight", (256, 128)),
    "transformer.transformer_blocks.0.ff.net.0.proj": ("joint_blocks.0.x_block.mlp.fc1.weight", None),
    # The last block's context modulation: the key map adds swap_scale_shift (diffusers orders it
    # scale, shift; ComfyUI shift, scale).
    "transformer.transformer_blocks.1.norm1_context.linear": ("joint_blocks.1.context_block.adaLN_modulation.1.weight",
                                                              None),
}


def _swap_halves(d):
    half = d.shape[0] // 2
    return np.concatenate([d[half:], d[:half]])


def _sd3_split_lora(models):
    shapes = {}
    for module, (key, rows) in SD3_SPLIT.items():
        m, n = dm.sd3_layout()[key]
        shapes[module] = (rows[1] if rows else m, n)
    factors = dm.lora_factors(shapes, _rng(models.seed, 4))
    return factors, dm.diffusers_lora(factors)


def test_sd3_diffusers_lora_slices_and_modulation_equal_the_float64_reference(comfy_host, pack, models):
    factors, lora = _sd3_split_lora(models)
    name = comfy_host.save_lora(lora, "sd3_diffusers_split.safetensors")
    out, cap = _run(comfy_host, models, _transfer_graph(models.sd3_src, models.sd3_tgt, name, rank=SD3_RANK,
                                                        save="lorax/sd3_split"))
    handle = cap["cap_handle"]
    expected = {}
    for module, (key, rows) in SD3_SPLIT.items():
        up, down = factors[module]
        delta = up.double().numpy() @ down.double().numpy()
        target = models.sd3_ft[key].double().numpy()
        if rows is None:
            name_ = P + key
            if "norm1_context" in module:
                delta = _swap_halves(delta)
        else:
            name_ = WeightSlice(P + key, 0, *rows).name
            target = target[rows[0]:rows[0] + rows[1]]
        U, _, V = top_svd(target, SD3_RANK)
        moved = handle.result.deltas[name_].matrix().double()
        assert rel_err(moved, lorax_ref(delta, U, V)) < HALF_FACTOR_TOL, module
        span = None if rows is None else (rows[0], rows[0] + rows[1])
        expected.setdefault(P + key, {})[span] = moved
    patched = comfy_host.patched_weights(cap["cap_model"], list(expected))
    for key, parts in expected.items():
        _check_patched(patched[key], _weight(cap["cap_tgt"], key), parts)
    fams = {family_of(r["key"]) for r in json.loads(cap["cap_json"])}
    assert fams == {"x_block.attn.qkv[q]", "x_block.attn.qkv[k]", "x_block.attn.qkv[v]", "context_block.attn.qkv[k]",
                    "x_block.attn2.qkv[v]", "x_block.mlp.fc1", "context_block.adaLN_modulation"}
    assert handle.verdict.startswith("Verdict: fits — all 7 adapter modules map onto layers of this SD3 model")
    # The saved file: x_block.attn.qkv's three slices merged into one module; stock loader agrees.
    tensors = load_tensors(cap["cap_path"])
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (384, 3 * 4)
    stock = comfy_host.run_prompt({
        "tgt": _loader(models.sd3_tgt),
        "stock": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["tgt", 0], "strength_model": 1.0, "lora_name": cap["cap_path"].split("/loras/")[-1]}},
        "cap": host.capture(["stock", 0])}, executor=models.executor)
    again = comfy_host.patched_weights(stock["cap"]["value"][0], list(expected))
    for key, parts in expected.items():
        _check_patched(again[key], _weight(cap["cap_tgt"], key), parts)


SD3_KOHYA = ["joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.mlp.fc2.weight",
             "joint_blocks.1.x_block.adaLN_modulation.1.weight"]


def _sd3_kohya_lora(models, keys, salt=5):
    factors = dm.lora_factors({dm.kohya_name(k): dm.sd3_layout()[k] for k in keys}, _rng(models.seed, salt))
    return factors, dm.kohya_lora(factors, alpha=2.0)


@pytest.mark.parametrize("dtype", ["default", "fp8_e4m3fn"])
def test_sd3_kohya_fused_lora_equals_the_float64_reference(comfy_host, pack, models, dtype):
    """Whole fused modules; with fp8 weights the model stays fp8 (each layer is upcast on its own
    for the SVD) and the reference is computed from the fp8 values as the model holds them."""
    factors, lora = _sd3_kohya_lora(models, SD3_KOHYA)
    name = comfy_host.save_lora(lora, "sd3_kohya_fused.safetensors")
    _, cap = _run(comfy_host, models, _transfer_graph(models.sd3_src, models.sd3_tgt, name, rank=SD3_RANK, dtype=dtype))
    handle = cap["cap_handle"]
    fp8 = dtype.startswith("fp8")
    for key in SD3_KOHYA:
        held = _weight(cap["cap_tgt"], P + key)
        assert held.dtype == (torch.float8_e4m3fn if fp8 else torch.float32)
        up, down = factors[dm.kohya_name(key)]
        delta = up.double().numpy() @ down.double().numpy() * (2.0 / up.shape[1])
        U, _, V = top_svd(held.float().double().numpy(), SD3_RANK)
        assert rel_err(handle.result.deltas[P + key].matrix(), lorax_ref(delta, U, V)) < HALF_FACTOR_TOL, key
    if fp8:
        assert all(p.dtype == torch.float8_e4m3fn for k, p in cap["cap_src"].model.state_dict().items()
                   if k.endswith(".weight") and "joint_blocks" in k and p.dim() == 2)
    assert {family_of(k) for k in handle.result.deltas} == {
        "x_block.attn.qkv", "context_block.mlp.fc2", "x_block.adaLN_modulation"}


def test_sd3_similarity_report_names_joint_block_families(comfy_host, pack, models):
    out, cap = _run(comfy_host, models, {
        "src": _loader(models.sd3_src), "tgt": _loader(models.sd3_tgt),
        "sim": {"class_type": "LoraxSimilarityReport", "inputs": {
            "source_model": ["src", 0], "target_model": ["tgt", 0], "rank": SD3_RANK,
            "layers": "adapted by LoRAs (attention, feed-forward, proj)", "threshold": 0.3}},
        "cap_json": host.capture(["sim", 2])})
    rows = json.loads(cap["cap_json"])
    blocks = {b["name"]: [f[0] for f in b["families"]] for b in out["sim"]["lorax_report"][0]["blocks"]}
    assert blocks["joint_blocks.0"] == ["x_block.attn.qkv", "x_block.attn.proj", "x_block.attn2.qkv",
                                        "x_block.attn2.proj", "x_block.mlp.fc1", "x_block.mlp.fc2",
                                        "x_block.adaLN_modulation", "context_block.attn.qkv", "context_block.attn.proj",
                                        "context_block.mlp.fc1", "context_block.mlp.fc2",
                                        "context_block.adaLN_modulation"]
    assert blocks["joint_blocks.1"] == ["x_block.attn.qkv", "x_block.attn.proj", "x_block.mlp.fc1", "x_block.mlp.fc2",
                                        "x_block.adaLN_modulation", "context_block.attn.qkv",
                                        "context_block.adaLN_modulation"]
    assert all(r["decision"] == "passes threshold" for r in rows)  # a 5 % fine-tune


def test_verdict_for_a_partly_matching_lora_and_an_unrelated_target(comfy_host, pack, models):
    """A LoRA for a six-block SD3 of the same width on the two-block model: two of six modules map;
    the matching LoRA on an unrelated model of the same architecture: all map, none passes."""
    deep = [f"joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(6)]
    factors = dm.lora_factors({dm.kohya_name(k): (384, 128) for k in deep}, _rng(models.seed, 6))
    name = comfy_host.save_lora(dm.kohya_lora(factors, alpha=2.0), "sd3_deeper.safetensors")
    _, cap = _run(comfy_host, models, _transfer_graph(models.sd3_src, models.sd3_tgt, name, rank=SD3_RANK))
    assert core(cap["cap_handle"].verdict) == (
        "Verdict: fits partly — 2 of 6 adapter modules (33 %) map onto layers of this SD3 model (4 match none, e.g. "
        "lora_unet_joint_blocks_2_x_block_attn_qkv); 2 of 2 mapped layers (100 %) pass the similarity threshold "
        "(Φ̂ ≥ 0.3).")
    assert cap["cap_handle"].report.split("\n")[1] == cap["cap_handle"].verdict
    _, lora = _sd3_kohya_lora(models, SD3_KOHYA)
    name = comfy_host.save_lora(lora, "sd3_kohya_for_unrelated.safetensors")
    _, cap = _run(comfy_host, models, _transfer_graph(models.sd3_src, models.sd3_other, name, rank=SD3_RANK))
    assert not cap["cap_model"].patches
    assert core(cap["cap_handle"].verdict) == (
        "Verdict: does not fit — all 3 adapter modules map onto layers of this SD3 model, but none of the 3 compared "
        "layers passes the similarity threshold (Φ̂ ≥ 0.3): the target is no close relative of the source. Nothing "
        "was transferred.")


def test_a_flux_lora_on_sd3_is_named_as_such(comfy_host, pack, models):
    lora = dm.kohya_lora(dm.lora_factors({"lora_unet_double_blocks_0_img_attn_qkv": (9, 6)}, _rng(models.seed, 7)), 1.0)
    name = comfy_host.save_lora(lora, "flux_on_sd3.safetensors")
    with pytest.raises(host.ComfyExecutionError) as e:
        comfy_host.run_prompt(_transfer_graph(models.sd3_src, models.sd3_tgt, name, rank=SD3_RANK),
                              executor=models.executor)
    assert e.value.details["exception_message"].strip().endswith(
        "Verdict: does not fit — the adapter's only module matches no layer of this SD3 model: it was made for "
        "another architecture (its module names say Flux.1 or Chroma). Nothing was transferred; connect a source "
        "model of the "
        "adapter's own architecture.")


def test_split_sd3_lora_to_lorax_keeps_slices(comfy_host, pack, models):
    """LoRA to LoRA-X on a split LoRA: one Δσ vector per slice, named by the diffusers module; LoRA-X
    Load puts ``U_r diag(Δσ) V_rᵀ`` of each source slice back into its rows only."""
    factors, lora = _sd3_split_lora(models)
    name = comfy_host.save_lora(lora, "sd3_split_for_convert.safetensors")
    out, cap = _run(comfy_host, models, {
        "src": _loader(models.sd3_src),
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": name, "strength": 1.0}},
        "convert": {"class_type": "LoraxConvert", "inputs": {"model": ["src", 0], "adapter": ["load", 1],
                                                             "rank": SD3_RANK, "filename_prefix": "lorax/sd3_split"}},
        "cap_adapter": host.capture(["convert", 0]), "cap_src": host.capture(["src", 0])})
    adapter = cap["cap_adapter"]
    assert len(adapter.content.sigmas) == len(SD3_SPLIT)
    assert {m for m, (_, rows) in SD3_SPLIT.items() if rows} <= set(adapter.content.sigmas)  # slices: own names
    _, back = _run(comfy_host, models, {
        "src": _loader(models.sd3_src),
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": adapter.name,
                                                       "strength": 1.0}},
        "cap_model": host.capture(["load", 0])})
    module = "transformer.transformer_blocks.0.attn.add_k_proj"
    key, (start, size) = SD3_SPLIT[module]
    up, down = factors[module]
    U, _, V = top_svd(models.sd3[key].double().numpy()[start:start + size], SD3_RANK)
    sigma = np.einsum("ik,ij,jk->k", U, up.double().numpy() @ down.double().numpy(), V)  # u_iᵀ ΔW v_i
    patched = comfy_host.patched_weights(back["cap_model"], [P + key])[P + key]
    _check_patched(patched, _weight(cap["cap_src"], P + key), {(start, start + size): (U * sigma) @ V.T})


# --------------------------------------------------------------------------------------------
# The families people run now (tests/dit_families.py)
# --------------------------------------------------------------------------------------------

_FAMILY_FILES: dict[str, tuple[str, str]] = {}


@pytest.fixture(scope="module")
def family_runs(comfy_host, seed):
    """One executor for the family tests; each family's pair is built once, and the previous
    family's models are let go before the next is built (the wide ones are ~0.4–0.9 B parameters)."""
    runs = types.SimpleNamespace(executor=comfy_host.new_executor(), seed=seed)
    yield runs
    _FAMILY_FILES.clear()
    comfy_host.unload_all()


def _family_pair(comfy_host, case: df.FamilyCase, seed: int) -> tuple[str, str]:
    if case.id not in _FAMILY_FILES:
        _FAMILY_FILES.clear()
        comfy_host.unload_all()
        source, target = df.build_pair(case, seed)
        _FAMILY_FILES[case.id] = (comfy_host.save_unet(source, f"mini_{case.id}.safetensors"),
                                  comfy_host.save_unet(target, f"mini_{case.id}_finetune.safetensors"))
    return _FAMILY_FILES[case.id]


def _stock_load(comfy_host, runs, model: str, dtype: str, lora_path: str):
    """ComfyUI's LoraLoaderModelOnly with a file LoRA-X Save wrote: the patched model."""
    out = comfy_host.run_prompt({
        "tgt": _loader(model, dtype),
        "stock": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["tgt", 0], "strength_model": 1.0,
                                                                  "lora_name": lora_path.split("/loras/")[-1]}},
        "cap": host.capture(["stock", 0])}, executor=runs.executor)
    return out["cap"]["value"][0]


@pytest.mark.parametrize("case", df.CASES, ids=lambda c: c.id)
def test_a_family_lora_moves_onto_a_fine_tune_and_loads_back_in_the_stock_loader(comfy_host, pack, family_runs,
                                                                                   case, caplog):
    """Detected as the intended class, every layer moved ("fits"), the report named by the model's
    own blocks, the written LoRA loaded by ComfyUI's stock loader onto the target with no key left."""
    source, target = _family_pair(comfy_host, case, family_runs.seed)
    shapes = df.layout(case.config)
    _, lora = df.lora_for(case, shapes, _rng(family_runs.seed, 20))
    name = comfy_host.save_lora(lora, f"{case.id}_lora.safetensors")
    out, cap = _run(comfy_host, family_runs, _transfer_graph(source, target, name, rank=RANK, dtype=case.dtype,
                                                             save=f"lorax/{case.id}"))
    kind = pack.nodes.bridge.model_kind
    assert kind(cap["cap_src"]) == kind(cap["cap_tgt"]) == case.kind
    assert {k[len(P):] for k in cap["cap_tgt"].model.state_dict() if k.startswith(P)} == set(shapes)
    handle, n = cap["cap_handle"], len(case.modules)
    assert core(handle.verdict) == (f"Verdict: fits — all {n} adapter modules map onto layers of this {case.kind} model; "
                              f"{n} of {n} mapped layers (100 %) pass the similarity threshold (Φ̂ ≥ 0.3).")
    assert [l.decision.value for l in handle.result.layers] == ["transferred"] * n
    payload = out["transfer"]["lorax_report"][0]
    assert {b["name"]: [f[0] for f in b["families"]] for b in payload["blocks"]} == case.blocks
    with caplog.at_level(logging.WARNING):
        stock = _stock_load(comfy_host, family_runs, target, case.dtype, cap["cap_path"])
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert set(stock.patches) == {P + key for key, _ in case.modules.values()}


def test_a_flux_lora_on_chroma_names_the_pruned_modulation_modules(comfy_host, pack, family_runs):
    """Chroma dropped Flux's per-block modulations (one shared distilled guidance layer instead):
    a Flux LoRA that trained them fits partly, and the report names the modules left over."""
    case = df.CASE["chroma"]
    source, target = _family_pair(comfy_host, case, family_runs.seed)
    modules = {"lora_unet_double_blocks_0_img_attn_qkv": (9216, H), "lora_unet_double_blocks_0_img_mod_lin": (6 * H, H),
               "lora_unet_single_blocks_0_modulation_lin": (3 * H, H)}
    name = comfy_host.save_lora(dm.kohya_lora(dm.lora_factors(modules, _rng(family_runs.seed, 21)), alpha=4.0),
                                "flux_with_modulation_on_chroma.safetensors")
    _, cap = _run(comfy_host, family_runs, _transfer_graph(source, target, name, rank=RANK, dtype=case.dtype))
    handle = cap["cap_handle"]
    assert core(handle.verdict) == (
        "Verdict: fits partly — 1 of 3 adapter modules (33 %) map onto layers of this Chroma model (2 match none, "
        "e.g. lora_unet_double_blocks_0_img_mod_lin); 1 of 1 mapped layers (100 %) pass the similarity threshold "
        "(Φ̂ ≥ 0.3).")
    assert ("2 adapter modules match no layer of the model: lora_unet_double_blocks_0_img_mod_lin, "
            "lora_unet_single_blocks_0_modulation_lin.") in handle.report


# --------------------------------------------------------------------------------------------
# Layers that match by name but differ in shape
# --------------------------------------------------------------------------------------------

FLUX1_ON_FLUX2 = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.proj.weight",
                  "double_blocks.0.img_mlp.0.weight", "double_blocks.0.img_mlp.2.weight",
                  "double_blocks.0.txt_attn.qkv.weight"]


def test_a_flux1_lora_on_flux2_says_the_widths_differ(comfy_host, pack, models):
    """Flux.2 keeps Flux.1's block names at twice the width (6144: detection fixes 48 heads of 128),
    so every module maps by name and none has the source's shape: the verdict says so with the widths,
    no layer is called compared, and nothing is saved. The mini Flux.2 (one double block, 1.7 B
    parameters) is stored and loaded as fp8."""
    flux2 = df.build_model(df.FLUX2_CONFIG, {}, zero_dtype=torch.float8_e4m3fn)
    target = comfy_host.save_unet(flux2, "mini_flux2.safetensors")
    del flux2
    layout = dm.flux_layout(True)
    factors = dm.lora_factors({dm.kohya_name(k): layout[k] for k in FLUX1_ON_FLUX2}, _rng(models.seed, 30))
    name = comfy_host.save_lora(dm.kohya_lora(factors, alpha=4.0), "flux1_on_flux2.safetensors")
    try:
        _, cap = _run(comfy_host, models, _transfer_graph(models.dev, target, name, rank=RANK, dtype="fp8_e4m3fn"))
        assert pack.nodes.bridge.model_kind(cap["cap_tgt"]) == "Flux2"
        handle = cap["cap_handle"]
        assert core(handle.verdict) == (
            "Verdict: does not fit — all 5 adapter modules map onto layers of this Flux2 model by name, but all 5 of "
            "them differ in shape: the target's layers are 6144 wide, the source's 3072: this adapter cannot move "
            "onto this model by name. Nothing was transferred.")
        assert [l.decision.value for l in handle.result.layers] == ["skipped: shape mismatch"] * 5
        assert not handle.result.deltas and not cap["cap_model"].patches
    finally:
        comfy_host.unload_all()
        os.remove(comfy_host.folders["diffusion_models"] / target)


def _wan(config, weights, comfy_host, name):
    return comfy_host.save_unet(df.build_model(config, weights), name)


def test_paired_scores_the_side_two_layers_share_and_reports_the_energy_kept(comfy_host, pack, family_runs):
    """Wan with a 256- and a 512-wide FFN (both WAN21_T2V): ffn.0 shares its 128-wide input side
    (the target's rows are two fine-tunes of the source's), ffn.2 its output side (the target's is
    unrelated). The paired rule moves both, each scored on its shared side at the common rank — high
    for ffn.0, near chance for ffn.2 — and the verdict never counts them as passing."""
    seed, keys = family_runs.seed, ("blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight", "blocks.0.ffn.2.weight")
    small, wide = df.layout(df.CASE["wan21_t2v"].config), df.layout(df.WAN_WIDER_FFN)
    source = {k: dm.KnownSVD.make(*small[k], seed=seed, key=k).matrix() for k in keys}
    ft = [host.fine_tune(source, seed=seed + i, strength=0.05) for i in (1, 2)]
    target = {keys[0]: ft[0][keys[0]], keys[1]: torch.cat([ft[0][keys[1]], ft[1][keys[1]]]) / 2 ** 0.5,
              keys[2]: dm.KnownSVD.make(*wide[keys[2]], seed=seed + 3, key=keys[2]).matrix()}
    src = _wan(df.CASE["wan21_t2v"].config, source, comfy_host, "mini_wan_ffn256.safetensors")
    tgt = _wan(df.WAN_WIDER_FFN, target, comfy_host, "mini_wan_ffn512.safetensors")
    factors = dm.lora_factors({dm.kohya_name(k): small[k] for k in keys}, _rng(seed, 31))
    name = comfy_host.save_lora(dm.kohya_lora(factors, alpha=4.0), "wan_ffn_paired.safetensors")
    _, cap = _run(comfy_host, family_runs, _transfer_graph(src, tgt, name, rank=RANK, shape_rule="paired"))
    rows = {r["key"][len(P):]: r for r in json.loads(cap["cap_json"])}
    q, up, down = (rows[k] for k in keys)
    assert [r["decision"] for r in (q, up, down)] == ["transferred"] * 3
    assert q["phi_hat"] > 0.9 and q["phi_hat_right"] > 0.9
    assert up["phi_hat"] is None and up["phi_hat_right"] > 0.9 and "on the input side they share (128)" in up["note"]
    assert down["phi_hat_right"] is None and abs(down["phi_hat"]) < 0.3 and down["rank"] == 64
    assert "on the output side they share (128)" in down["note"]
    kept = sorted(r["energy_kept"] for r in (up, down))
    assert 0 < kept[0] <= kept[1] <= 1
    lo, hi = (f"{100 * x:.0f}" for x in kept)  # a range, or one figure when both round alike
    assert core(cap["cap_handle"].verdict) == (
        "Verdict: fits partly — all 3 adapter modules map onto layers of this WAN21_T2V model; 1 of 1 mapped layers "
        "(100 %) pass the similarity threshold (Φ̂ ≥ 0.3); 2 layers were moved across shapes by the paired rule, "
        f"scored only on the side they share (Φ̂ {down['phi_hat']:.2f}–{up['phi_hat_right']:.2f}; the threshold does "
        f"not apply to the paired rule); the paired rule kept {lo if lo == hi else f'{lo}–{hi}'} % of each "
        "delta's energy.")


def _cli(argv, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(host.REPO_ROOT), LORAX_SVD_CACHE="off")
    return subprocess.run([sys.executable, "-m", "lorax", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_cli_across_widths_exits_2_with_the_widths_and_paired_moves_unscored(tmp_path, comfy_host, seed):
    """Wan 128 wide → Wan 256 wide (both WAN21_T2V): every layer differs on both sides. The command
    line prints the width sentence, writes nothing and exits 2; with ``--shape-rule paired`` it moves
    them, says they could not be scored, and how much of each delta survived."""
    from safetensors.torch import save_file

    keys = ("blocks.0.self_attn.q.weight", "blocks.0.cross_attn.k.weight", "blocks.0.ffn.0.weight")
    configs = {"narrow": df.CASE["wan21_t2v"].config, "wide": df.WAN_WIDER}
    for label, config in configs.items():
        shapes = df.layout(config)
        weights = {k: dm.KnownSVD.make(*shapes[k], seed=seed, key=k).matrix() for k in keys}
        save_file(df.build_model(config, weights), str(tmp_path / f"{label}.safetensors"))
    narrow = df.layout(configs["narrow"])
    factors = dm.lora_factors({dm.kohya_name(k): narrow[k] for k in keys}, _rng(seed, 32))
    save_file(dm.kohya_lora(factors, alpha=4.0), str(tmp_path / "lora.safetensors"))
    argv = ["transfer", "--source", "narrow.safetensors", "--target", "wide.safetensors", "--adapter",
            "lora.safetensors", "--out", "out.safetensors", "--rank", "32"]
    proc = _cli(argv, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("all 3 adapter modules map onto layers of this WAN21_T2V model by name, but all 3 of them differ in "
            "shape: the target's layers are 256 wide, the source's 128: this adapter cannot move onto this model by "
            "name. Nothing was transferred.") in proc.stdout
    assert "nothing written to out.safetensors" in proc.stdout and not (tmp_path / "out.safetensors").exists()
    proc = _cli(argv + ["--shape-rule", "paired"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("Verdict: fits partly — all 3 adapter modules map onto layers of this WAN21_T2V model; 3 layers were "
            "moved across shapes by the paired rule without a similarity score (the target's layers are 256 wide, "
            "the source's 128: Φ̂ compares subspaces of one space, and these layers share no side); the paired "
            "rule kept") in proc.stdout
    assert "Φ̂" not in "".join(l for l in proc.stdout.splitlines() if l.startswith("transferred"))
    assert (tmp_path / "out.safetensors").exists()
