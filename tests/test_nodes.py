"""The LoRA-X nodes on the real ComfyUI host, through its own executor.

Reference values come from the pure library (or plain float64 algebra) applied to the same
state dicts the graphs load from disk. Tolerances: patched weights are float32, so a patched
weight minus the base weight carries rounding of ~6e-8·‖W‖; with ‖W‖/‖ΔW‖ ≈ 10–100 for these
LoRAs that is ≤ ~1e-5 of ‖ΔW‖, hence 1e-4 relative on deltas and 1e-5 on whole weights. Deltas
the nodes build from singular vectors (Gram route) against a float64 SVD also carry the engine's
float16 rounding of U and V: reference.HALF_FACTOR_TOL (measured ~4e-4) instead of 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import host
from lorax.delta import Delta
from lorax.engine import SVDEngine
from lorax.fingerprint import weight_sketch
from lorax.lorax_adapter import LoraxAdapter, save_lorax
from lorax.safetensors_io import read_metadata
from lorax.transfer import DictWeights, TransferSettings, transfer_deltas
from reference import HALF_FACTOR_TOL, rel_err

ATTN = [f"input_blocks.1.1.transformer_blocks.0.{a}.{p}.weight" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")]
PROJ = "input_blocks.1.1.proj_in.weight"  # a 1×1 conv in SD1.5
LORA_KEYS = ATTN + [PROJ, "output_blocks.2.1.transformer_blocks.0.ff.net.2.weight"]


@pytest.fixture(scope="module")
def pack(comfy_host):
    nodes = comfy_host.load_pack(host.REPO_ROOT)
    assert {"LoraxLoad", "LoraxTransfer", "LoraxSimilarityReport", "LoraxSave"} <= set(nodes)
    return comfy_host.pack_module(host.REPO_ROOT)


@pytest.fixture(scope="module")
def target_sd(mini_sd15):
    return host.fine_tune(mini_sd15, seed=1, strength=0.05)


@pytest.fixture(scope="module")
def target_name(comfy_host, target_sd):
    return comfy_host.save_unet(target_sd, "mini_sd15_finetune.safetensors")


def _lora_factors(sd, keys, rank=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in keys:
        w = sd[key]
        out[key] = (torch.randn(w.shape[0], rank, generator=g) * 0.05,
                    torch.randn(rank, w[0].numel(), generator=g).reshape(rank, *w.shape[1:]) * 0.05)
    return out


@pytest.fixture(scope="module")
def kohya_lora(comfy_host, mini_sd15):
    factors = _lora_factors(mini_sd15, LORA_KEYS)
    lora = host.make_kohya_lora(factors, alpha=2.0)
    return comfy_host.save_lora(lora, "style_kohya.safetensors"), factors


def _loaders(src, tgt):
    return {
        "src": {"class_type": "UNETLoader", "inputs": {"unet_name": src, "weight_dtype": "default"}},
        "tgt": {"class_type": "UNETLoader", "inputs": {"unet_name": tgt, "weight_dtype": "default"}},
    }


def _transfer_prompt(src, tgt, lora_name, **settings):
    inputs = {"source_model": ["src", 0], "target_model": ["tgt", 0], "adapter": ["load", 1], "strength": 1.0,
              "rank": 64, "threshold": 0.3, "mode": "lorax", "exact": False}
    inputs.update(settings)
    p = host.unet_ksampler_prompt("unused", model_link=["transfer", 0], extra={
        **_loaders(src, tgt),
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": lora_name, "strength": 1.0}},
        "transfer": {"class_type": "LoraxTransfer", "inputs": inputs},
        "cap_src": host.capture(["src", 0]),
        "cap_tgt": host.capture(["tgt", 0]),
        "cap_model": host.capture(["transfer", 0]),
        "cap_handle": host.capture(["transfer", 2]),
        "cap_json": host.capture(["transfer", 5]),
    })
    del p["unet"]
    return p


def _reference_transfer(mini_sd15, target_sd, factors, alpha, rank, threshold, mode="lorax"):
    deltas = {}
    for key, (up, down) in factors.items():
        r = down.shape[0]
        deltas["diffusion_model." + key] = Delta.factored(mini_sd15[key].shape, up.double() * (alpha / r), down.double())
    prefix = lambda sd: {"diffusion_model." + k: v for k, v in sd.items()}
    return transfer_deltas(deltas, DictWeights(prefix(mini_sd15)), DictWeights(prefix(target_sd)),
                           TransferSettings(rank=rank, threshold=threshold, mode=mode), SVDEngine(method="exact"))


@pytest.mark.parametrize("mode", ["lorax", "prolora"])
def test_transfer_graph_runs_and_patches_target_with_projected_deltas(
        comfy_host, pack, mini_sd15, mini_sd15_unet_name, target_sd, target_name, kohya_lora, mode):
    lora_name, factors = kohya_lora
    out = comfy_host.run_prompt(_transfer_prompt(mini_sd15_unet_name, target_name, lora_name, mode=mode))
    assert torch.isfinite(out["out"]["value"][0]["samples"]).all()  # KSampler ran on the patched target
    model, src_model, tgt_model = (out[k]["value"][0] for k in ("cap_model", "cap_src", "cap_tgt"))
    ref = _reference_transfer(mini_sd15, target_sd, factors, alpha=2.0, rank=64, threshold=0.3, mode=mode)
    ref_deltas = ref.deltas
    assert len(ref_deltas) == len(LORA_KEYS)  # a light fine-tune: every layer clears the threshold
    patched = comfy_host.patched_weights(model, list(ref_deltas))
    for key, delta in ref_deltas.items():
        base = target_sd[key[len("diffusion_model."):]]
        assert rel_err(patched[key].double() - base.double(), delta.weight()) < HALF_FACTOR_TOL, key
    # Inputs untouched: no patches on the loaded models, weights equal to the files.
    assert not src_model.patches and not tgt_model.patches
    for key in LORA_KEYS:
        assert torch.equal(tgt_model.model.diffusion_model.state_dict()[key], target_sd[key])
        assert torch.equal(src_model.model.diffusion_model.state_dict()[key], mini_sd15[key])
    rows = json.loads(out["cap_json"]["value"][0])
    assert {r["decision"] for r in rows} == {"transferred"} and len(rows) == len(LORA_KEYS)
    assert all(0.3 <= r["phi_hat"] <= 1.0 for r in rows)


def test_default_mode_keeps_the_whole_delta_on_a_near_fine_tune(
        comfy_host, pack, mini_sd15, mini_sd15_unet_name, target_sd, target_name, kohya_lora):
    """Every layer of this target moved ≤ 5 %: the node's default writes the adapter's own delta (cosine ≥ 0.98,
    norm ratio 0.95–1.05 asked; a copy gives 1 and 1 up to float32 patching), decomposes nothing, and says so."""
    from lorax.transfer import DEFAULT_COPY_BELOW, DEFAULT_MODE

    lora_name, factors = kohya_lora
    engine = pack.nodes.runtime.get_engine(False)
    decomposed = engine.stats.layers_decomposed
    out = comfy_host.run_prompt(_transfer_prompt(mini_sd15_unet_name, target_name, lora_name, mode=DEFAULT_MODE))
    assert engine.stats.layers_decomposed == decomposed  # copied layers need no SVD
    model = out["cap_model"]["value"][0]
    keys = ["diffusion_model." + k for k in LORA_KEYS]
    patched = comfy_host.patched_weights(model, keys)
    for key in LORA_KEYS:
        up, down = factors[key]
        given = (up.double() @ down.double().reshape(down.shape[0], -1)).reshape(target_sd[key].shape) * (2.0 / 4)
        written = patched["diffusion_model." + key].double() - target_sd[key].double()
        cos = float((written * given).sum() / (written.norm() * given.norm()))
        assert cos >= 0.98 and 0.95 <= float(written.norm() / given.norm()) <= 1.05, (key, cos)
    rows = json.loads(out["cap_json"]["value"][0])
    assert {r["how"] for r in rows} == {"copied"}, rows
    assert all(0.0 < r["weight_change"] <= min(0.06, DEFAULT_COPY_BELOW) and r["cos_kept"] == 1.0 for r in rows)
    report = out["cap_handle"]["value"][0].report
    assert f"{len(LORA_KEYS)} copied" in report, report


def test_unrelated_target_skips_layers_and_report_says_so(comfy_host, pack, mini_sd15_unet_name, kohya_lora):
    other = comfy_host.save_unet(host.build_mini_sd15_unet(seed=99), "mini_sd15_unrelated.safetensors")
    out = comfy_host.run_prompt(_transfer_prompt(mini_sd15_unet_name, other, kohya_lora[0]))
    rows = json.loads(out["cap_json"]["value"][0])
    assert all(r["decision"] == "skipped: similarity below threshold" for r in rows)
    assert not out["cap_model"]["value"][0].patches  # nothing transferred, nothing patched
    handle = out["cap_handle"]["value"][0]
    assert f"0 of {len(LORA_KEYS)} layers transferred" in handle.result.summary()


def test_lorax_load_of_ordinary_lora_equals_stock_loader(comfy_host, pack, mini_sd15_unet_name, kohya_lora):
    lora_name, _ = kohya_lora
    out = comfy_host.run_prompt({
        "src": {"class_type": "UNETLoader", "inputs": {"unet_name": mini_sd15_unet_name, "weight_dtype": "default"}},
        "ours": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": lora_name, "strength": 0.7}},
        "stock": {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["src", 0], "lora_name": lora_name, "strength_model": 0.7}},
        "a": host.capture(["ours", 0]), "b": host.capture(["stock", 0]),
    })
    keys = ["diffusion_model." + k for k in LORA_KEYS]
    ours = comfy_host.patched_weights(out["a"]["value"][0], keys)
    stock = comfy_host.patched_weights(out["b"]["value"][0], keys)
    for k in keys:
        assert rel_err(ours[k], stock[k]) < 1e-5


def _lycoris_files(mini_sd15):
    """One file per adapter family, in the layouts LyCORIS / kohya / PEFT write."""
    g = torch.Generator().manual_seed(11)
    q = ATTN[0]
    conv_key = "input_blocks.1.0.in_layers.2.weight"  # a 3×3 conv
    w, wc = mini_sd15[q], mini_sd15[conv_key]
    name = host.kohya_lora_prefix(q)
    cname = host.kohya_lora_prefix(conv_key)
    r = 4
    files = {
        "loha": {f"{name}.hada_w1_a": torch.randn(w.shape[0], r, generator=g) * 0.1,
                 f"{name}.hada_w1_b": torch.randn(r, w.shape[1], generator=g) * 0.1,
                 f"{name}.hada_w2_a": torch.randn(w.shape[0], r, generator=g) * 0.1,
                 f"{name}.hada_w2_b": torch.randn(r, w.shape[1], generator=g) * 0.1,
                 f"{name}.alpha": torch.tensor(2.0)},
        "lokr": {f"{name}.lokr_w1": torch.randn(4, 4, generator=g) * 0.1,
                 f"{name}.lokr_w2": torch.randn(w.shape[0] // 4, w.shape[1] // 4, generator=g) * 0.1},
        "dora": {f"{name}.lora_up.weight": torch.randn(w.shape[0], r, generator=g) * 0.05,
                 f"{name}.lora_down.weight": torch.randn(r, w.shape[1], generator=g) * 0.05,
                 f"{name}.alpha": torch.tensor(4.0),
                 f"{name}.dora_scale": w.norm(dim=1, keepdim=True) * 1.1},
        "locon_mid": {f"{cname}.lora_up.weight": torch.randn(wc.shape[0], r, 1, 1, generator=g) * 0.05,
                      f"{cname}.lora_down.weight": torch.randn(r, wc.shape[1], 1, 1, generator=g) * 0.05,
                      f"{cname}.lora_mid.weight": torch.randn(r, r, 3, 3, generator=g) * 0.05,
                      f"{cname}.alpha": torch.tensor(2.0)},
        "peft": {f"unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(r, w.shape[1], generator=g) * 0.05,
                 f"unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(w.shape[0], r, generator=g) * 0.05},
        "no_alpha": {f"{name}.lora_up.weight": torch.randn(w.shape[0], r, generator=g) * 0.05,
                     f"{name}.lora_down.weight": torch.randn(r, w.shape[1], generator=g) * 0.05},
    }
    return files


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora", "locon_mid", "no_alpha"])
def test_bridge_deltas_equal_what_the_host_applies(comfy_host, pack, mini_sd15, mini_sd15_unet_name, kind):
    """The library's view of each adapter family (factored or materialised) patches exactly like stock."""
    lora = _lycoris_files(mini_sd15)[kind]
    name = comfy_host.save_lora(lora, f"family_{kind}.safetensors")
    out = comfy_host.run_prompt({
        "src": {"class_type": "UNETLoader", "inputs": {"unet_name": mini_sd15_unet_name, "weight_dtype": "default"}},
        "stock": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["src", 0], "lora_name": name, "strength_model": 1.0}},
        "m": host.capture(["src", 0]), "s": host.capture(["stock", 0]),
    })
    base = out["m"]["value"][0]
    deltas = pack.nodes.bridge.ordinary_adapter_deltas(lora, base).deltas
    assert deltas
    if kind == "no_alpha":
        assert all(d.is_factored for d in deltas.values())
    ours = pack.nodes.bridge.patched_clone(base, deltas, 1.0)
    keys = list(deltas)
    a = comfy_host.patched_weights(ours, keys)
    b = comfy_host.patched_weights(out["s"]["value"][0], keys)
    for k in keys:
        assert rel_err(a[k], b[k]) < 1e-5, k


def test_lorax_adapter_load_reproduces_source_delta_and_rejects_other_model(
        comfy_host, pack, mini_sd15, mini_sd15_unet_name, target_name):
    r = 8
    rng = np.random.default_rng(3)
    sigmas, sketches, refs = {}, {}, {}
    for key in ATTN:
        module = host.kohya_lora_prefix(key)
        sigma = torch.from_numpy(rng.standard_normal(r) * 0.05).float()
        sigmas[module], sketches[module] = sigma, weight_sketch(mini_sd15[key])
        U, S, Vt = np.linalg.svd(mini_sd15[key].double().numpy(), full_matrices=False)
        refs[key] = (U[:, :r] * sigma.double().numpy()) @ Vt[:r]
    path = comfy_host.folders["loras"] / "planted_lorax.safetensors"
    save_lorax(path, LoraxAdapter(sigmas=sigmas, sketches=sketches))
    out = comfy_host.run_prompt({
        **_loaders(mini_sd15_unet_name, target_name),
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": path.name, "strength": 1.0}},
        "m": host.capture(["load", 0]),
    })
    keys = ["diffusion_model." + k for k in ATTN]
    patched = comfy_host.patched_weights(out["m"]["value"][0], keys)
    for key in ATTN:
        assert rel_err(patched["diffusion_model." + key].double() - mini_sd15[key].double(), refs[key]) < HALF_FACTOR_TOL
    with pytest.raises(AssertionError) as e:
        comfy_host.run_prompt({
            **_loaders(mini_sd15_unet_name, target_name),
            "load": {"class_type": "LoraxLoad", "inputs": {"model": ["tgt", 0], "adapter_name": path.name, "strength": 1.0}},
            "m": host.capture(["load", 0]),
        })
    assert "not the source this LoRA-X adapter was made for" in str(e.value) and "planted_lorax" in str(e.value)


def test_saved_lora_loads_in_stock_loader_like_the_transfer(comfy_host, pack, mini_sd15_unet_name, target_name,
                                                            kohya_lora):
    p = _transfer_prompt(mini_sd15_unet_name, target_name, kohya_lora[0], strength=0.8)
    p["save"] = {"class_type": "LoraxSave", "inputs": {"transfer": ["transfer", 2], "filename_prefix": "lorax/test",
                                                       "bake_strength": True}}
    p["cap_path"] = host.capture(["save", 0])
    out = comfy_host.run_prompt(p)
    path = out["cap_path"]["value"][0]
    meta = read_metadata(path)
    assert meta["ss_base_model_version"] == "sd_v1" and json.loads(meta["lorax_provenance"])["mode"] == "lorax"
    assert "Saved" in out["save"]["text"][0]
    rel = path.split("/loras/")[-1]
    stock = comfy_host.run_prompt({
        "tgt": {"class_type": "UNETLoader", "inputs": {"unet_name": target_name, "weight_dtype": "default"}},
        "stock": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["tgt", 0], "lora_name": rel, "strength_model": 1.0}},
        "s": host.capture(["stock", 0]),
    })
    keys = ["diffusion_model." + k for k in LORA_KEYS]
    a = comfy_host.patched_weights(out["cap_model"]["value"][0], keys)
    b = comfy_host.patched_weights(stock["s"]["value"][0], keys)
    for k in keys:
        assert rel_err(a[k], b[k]) < 1e-5, k


def test_similarity_report_node(comfy_host, pack, mini_sd15_unet_name, target_name):
    out = comfy_host.run_prompt({
        **_loaders(mini_sd15_unet_name, target_name),
        "sim": {"class_type": "LoraxSimilarityReport", "inputs": {
            "source_model": ["src", 0], "target_model": ["tgt", 0], "rank": 32,
            "layers": "adapted by LoRAs (attention, feed-forward, proj)", "threshold": 0.3}},
        "img": host.capture(["sim", 1]), "js": host.capture(["sim", 2]),
    })
    rows = json.loads(out["js"]["value"][0])
    assert len(rows) > 20 and all(0.0 < r["phi"] <= 1.0 for r in rows)
    assert {"key", "phi", "phi_right", "shape_source", "shape_target"} <= set(rows[0])
    image = out["img"]["value"][0]
    assert image.shape[0] == 1 and image.shape[-1] == 3 and float(image.max()) <= 1.0
    text = out["sim"]["text"][0]
    assert f"{sum(1 for r in rows if r['decision'] == 'passes threshold')} of {len(rows)} layers pass the threshold" in text
    assert all(r["decision"] == "passes threshold" for r in rows)  # a 5 % fine-tune: every layer similar


def test_rerun_does_not_recompute_svds(comfy_host, pack, mini_sd15_unet_name, target_name, kohya_lora):
    engine = pack.nodes.runtime.get_engine(False)
    executor = comfy_host.new_executor()
    comfy_host.run_prompt(_transfer_prompt(mini_sd15_unet_name, target_name, kohya_lora[0], threshold=0.25),
                          executor=executor)
    before = engine.stats.layers_decomposed
    comfy_host.run_prompt(_transfer_prompt(mini_sd15_unet_name, target_name, kohya_lora[0], threshold=0.25),
                          executor=executor)  # unchanged inputs: ComfyUI's cache, nothing re-executes
    comfy_host.run_prompt(_transfer_prompt(mini_sd15_unet_name, target_name, kohya_lora[0], threshold=0.35),
                          executor=executor)  # Transfer re-executes, SVDs come from the engine's memo
    assert engine.stats.layers_decomposed == before


def _expect_error(comfy_host, prompt, *needles):
    # Only outputs that depend on the bad node: ComfyUI runs whatever part of a graph validates.
    prompt = {k: v for k, v in prompt.items() if k not in ("cap_src", "cap_tgt")}
    with pytest.raises(AssertionError) as e:
        comfy_host.run_prompt(prompt)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_bad_inputs_give_one_clear_error_and_mutate_nothing(comfy_host, pack, mini_sd15, mini_sd15_unet_name,
                                                           target_name, kohya_lora):
    # An SDXL-style LoRA: keys the SD1.5 model does not have.
    foreign = comfy_host.save_lora({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.ones(4, 2),
                                    "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.ones(2, 4)},
                                   "foreign.safetensors")
    p = _transfer_prompt(mini_sd15_unet_name, target_name, foreign)
    _expect_error(comfy_host, p, "made for another architecture", "foreign.safetensors")

    p = _transfer_prompt(mini_sd15_unet_name, target_name, kohya_lora[0])
    p["transfer"]["inputs"]["target_model"] = ["src", 0]
    _expect_error(comfy_host, p, "source and target are the same model")

    _expect_error(comfy_host, _transfer_prompt(mini_sd15_unet_name, target_name, kohya_lora[0], rank=0), "rank")
    _expect_error(comfy_host, _transfer_prompt(mini_sd15_unet_name, target_name, kohya_lora[0], threshold=1.5),
                  "threshold")
    p = _transfer_prompt(mini_sd15_unet_name, target_name, "missing.safetensors")
    _expect_error(comfy_host, p, "missing.safetensors")
    # A direct call with a vanished file (e.g. deleted after the list was built) names it too.
    with pytest.raises(Exception) as e:
        pack.nodes.load_node.LoraxLoad.execute(None, "gone.safetensors", 1.0)
    assert "gone.safetensors" in str(e.value) and "not found" in str(e.value)
    # Nothing was mutated: a fresh load still equals the file and carries no patches.
    out = comfy_host.run_prompt({**_loaders(mini_sd15_unet_name, target_name), "m": host.capture(["src", 0])})
    m = out["m"]["value"][0]
    assert not m.patches
    assert torch.equal(m.model.diffusion_model.state_dict()[ATTN[0]], mini_sd15[ATTN[0]])
