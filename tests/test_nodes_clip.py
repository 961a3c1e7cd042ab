"""LoRA-X Transfer with an adapter that also changes the text encoder, on full SD1.5 checkpoints.

The checkpoints are the synthetic full SD1.5 pair (``mini_sd15_full_ckpt_name`` and its fine-tuned
twin, see tests/conftest.py): ``CheckpointLoaderSimple`` gives a real ComfyUI ``CLIP`` (CLIP-L,
``sd1_clip.SD1ClipModel``) next to the MODEL. The adapter is a kohya LoRA with UNet modules and
``lora_te_text_model_encoder_layers_*`` modules (ComfyUI's SD1 text-encoder naming,
``comfy.lora.model_lora_keys_clip``).

References come from the pure library on the text encoders' own state dicts, read from the CLIP
objects ComfyUI loaded (so the reference sees exactly the weights the node saw):
``lorax.transfer.transfer_deltas`` over ``DictWeights`` with ``SVDEngine(method="exact")`` (a full
float64 SVD), while the node runs its default Gram route.

Tolerances. ComfyUI runs the text encoder in float16 on CPU by default. Patching rounds
``W + ΔW`` to the weight's dtype, an error of ~2^-11·|W_ij| per entry, which for these layers
(‖W‖/‖ΔW′‖ ≈ 10–200 after projection) is up to ~10 % of the transferred delta itself: no statement
about the delta can be checked through float16 weights. The precise check (i) therefore loads the
text encoder in float32, as ComfyUI does when started with ``--fp32-text-enc`` (its own flag,
set for the duration of the test). Then the patched weight minus the target weight carries float32
rounding of ~6e-8·|W_ij| per entry, ≤ ~1e-5 of ‖ΔW′‖ even for ‖W‖/‖ΔW′‖ ≈ 200, and the Gram route
agrees with the exact SVD to ~1e-10 — but the engine rounds U and V to float16 (the SVD cache's
precision, ~4e-4 on projected deltas): hence reference.HALF_FACTOR_TOL on the delta (as in
test_nodes.py). The default float16 configuration is exercised by the Save check
(iii), where the Transfer's CLIP and the stock LoraLoader's CLIP go through the same float32
arithmetic and the same rounding, and by tests/test_example_workflows.py end to end.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import host
from lorax.delta import Delta
from lorax.engine import SVDEngine
from lorax.safetensors_io import read_metadata
from lorax.transfer import DictWeights, TransferSettings, transfer_deltas
from reference import HALF_FACTOR_TOL, rel_err

UNET_KEYS = [f"input_blocks.1.1.transformer_blocks.0.{a}.{p}.weight" for a in ("attn1", "attn2")
             for p in ("to_q", "to_v")] + ["output_blocks.2.1.transformer_blocks.0.ff.net.2.weight"]
# Both attention shapes and both MLP shapes (768², 3072×768, 768×3072), first and last layer.
TE_MODULES = [(0, "self_attn.q_proj"), (0, "self_attn.out_proj"), (0, "mlp.fc1"), (0, "mlp.fc2"),
              (11, "self_attn.v_proj"), (11, "mlp.fc1")]
TE_KEYS = [host.te_clip_key(layer, m) for layer, m in TE_MODULES]
ALPHA, LORA_RANK = 2.0, 4
RANK, THRESHOLD, STRENGTH = 64, 0.3, 0.8
TE_SKIPPED = "skipped: text encoder (no CLIP connected)"

# One exact engine for every reference in this module: its memo is keyed by weight content, so the
# target's decompositions are computed once for both references of the first test.
_EXACT = SVDEngine(method="exact")


@pytest.fixture(scope="module")
def pack(comfy_host):
    comfy_host.load_pack(host.REPO_ROOT)
    return comfy_host.pack_module(host.REPO_ROOT)


@pytest.fixture(scope="module")
def te_lora(comfy_host, mini_sd15):
    lora, factors = host.make_sd15_lora_with_te(mini_sd15, UNET_KEYS, TE_MODULES, rank=LORA_RANK, alpha=ALPHA)
    return comfy_host.save_lora(lora, "style_with_te.safetensors"), lora, factors


@pytest.fixture
def fp32_text_encoder(comfy_host, monkeypatch):
    """ComfyUI as started with ``--fp32-text-enc`` for this test (see the module docstring)."""
    import comfy.cli_args

    comfy_host.unload_all()
    monkeypatch.setattr(comfy.cli_args.args, "fp32_text_enc", True)
    yield
    comfy_host.unload_all()


def _transfer(source_clip: bool, clip: bool = True, **settings):
    inputs = {"source_model": ["base", 0], "target_model": ["ft", 0], "adapter": ["load", 1], "strength": STRENGTH,
              "rank": RANK, "threshold": THRESHOLD, "mode": "lorax", "exact": False}
    if clip:
        inputs["clip"] = ["ft", 1]
    if source_clip:
        inputs["source_clip"] = ["base", 1]
    inputs.update(settings)
    return {"class_type": "LoraxTransfer", "inputs": inputs}


def _graph(base, ft, lora_name, **transfers):
    p = {
        "base": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base}},
        "ft": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ft}},
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["base", 0], "adapter_name": lora_name, "strength": 1.0}},
        "cap_base_clip": host.capture(["base", 1]),
        "cap_ft_clip": host.capture(["ft", 1]),
    }
    for name, node in transfers.items():
        p[name] = node
        for i, what in ((0, "model"), (1, "clip"), (2, "handle"), (5, "json")):
            p[f"{name}_{what}"] = host.capture([name, i])
    return p


def _te_state(clip) -> dict[str, torch.Tensor]:
    """The unpatched text-encoder weights of a loaded CLIP, float64 (keys ``clip_l.transformer...``)."""
    sd = clip.cond_stage_model.state_dict()
    return {k: sd[k].detach().to(torch.float64, copy=True) for k in TE_KEYS}


def _file_te(ckpt_name, comfy_host) -> dict[str, torch.Tensor]:
    """The same weights as stored in the checkpoint file."""
    path = comfy_host.folders["checkpoints"] / ckpt_name
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in TE_KEYS:
            out[k] = f.get_tensor("cond_stage_model." + k[len("clip_l."):])
    return out


def _reference(factors, source_te, target_te):
    deltas = {k: Delta.factored(tuple(target_te[k].shape), factors[k][0].double() * (ALPHA / LORA_RANK),
                                factors[k][1].double()) for k in TE_KEYS}
    return transfer_deltas(deltas, DictWeights(source_te), DictWeights(target_te),
                           TransferSettings(rank=RANK, threshold=THRESHOLD, mode="lorax"), _EXACT)


def test_transfer_with_clip_patches_text_encoder_and_save_loads_in_stock_loader(
        comfy_host, pack, mini_sd15_full_ckpt_name, mini_sd15_full_ft_ckpt_name, te_lora, fp32_text_encoder):
    """(i) With ``clip`` (and ``source_clip``) connected the text-encoder layers are transferred:
    patched CLIP weight = target TE weight + strength · the library's projection; the input CLIPs
    stay unpatched and equal to the file. Without ``source_clip`` the target's own text encoder
    stands in for the source. (iii) LoRA-X Save writes ``lora_te_*`` modules that the stock
    LoraLoader (model + clip) loads onto the fine-tune, giving the same CLIP and UNet weights."""
    lora_name, lora, factors = te_lora
    p = _graph(mini_sd15_full_ckpt_name, mini_sd15_full_ft_ckpt_name, lora_name,
               t=_transfer(source_clip=True), t_own=_transfer(source_clip=False))
    p["save"] = {"class_type": "LoraxSave", "inputs": {"transfer": ["t", 2], "filename_prefix": "lorax/with_te",
                                                       "bake_strength": True}}
    p["cap_path"] = host.capture(["save", 0])
    out = comfy_host.run_prompt(p)
    v = {k: d["value"][0] for k, d in out.items() if "value" in d}
    base_clip, ft_clip = v["cap_base_clip"], v["cap_ft_clip"]
    assert ft_clip.cond_stage_model.state_dict()[TE_KEYS[0]].dtype == torch.float32  # --fp32-text-enc in effect

    source_te, target_te = _te_state(base_clip), _te_state(ft_clip)
    for name, src in (("t", source_te), ("t_own", target_te)):
        ref = _reference(factors, src, target_te)
        assert sorted(ref.deltas) == sorted(TE_KEYS), ref.summary()  # a light fine-tune: every TE layer passes
        rows = {r["key"]: r for r in json.loads(v[f"{name}_json"])}
        assert {k: rows[k]["decision"] for k in TE_KEYS} == {k: "transferred" for k in TE_KEYS}
        assert all(rows[k]["rank"] == RANK for k in TE_KEYS)
        clip_out = v[f"{name}_clip"]
        assert clip_out is not ft_clip and clip_out.cond_stage_model is ft_clip.cond_stage_model
        patched = comfy_host.patched_weights(clip_out.patcher, TE_KEYS)
        for k in TE_KEYS:
            err = rel_err(patched[k].double() - target_te[k], STRENGTH * ref.deltas[k].weight())
            assert err < HALF_FACTOR_TOL, (name, k, err)
        if name == "t_own":  # source = target: Φ = 1 on every layer
            assert all(rows[k]["phi_hat"] > 0.999 for k in TE_KEYS)
    assert "No source CLIP connected" in v["t_own_handle"].report

    # The input CLIPs were never patched and still hold the file's weights.
    assert not ft_clip.patcher.patches and not base_clip.patcher.patches
    for clip, ckpt in ((ft_clip, mini_sd15_full_ft_ckpt_name), (base_clip, mini_sd15_full_ckpt_name)):
        stored = _file_te(ckpt, comfy_host)
        now = clip.cond_stage_model.state_dict()
        for k in TE_KEYS:
            assert torch.equal(now[k], stored[k].to(now[k].dtype)), k

    # (iii) The saved file: kohya names for both parts, loadable by the stock LoraLoader.
    path = v["cap_path"]
    with safe_open(path, framework="pt") as f:
        saved_keys = set(f.keys())
    for layer, module in TE_MODULES:
        prefix = host.te_lora_prefix(layer, module)
        assert {f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight", f"{prefix}.alpha"} <= saved_keys, prefix
    assert any(k.startswith("lora_unet_") for k in saved_keys)
    assert not any(k.startswith("lora_te1_") or k.startswith("text_encoder") for k in saved_keys)
    assert read_metadata(path)["ss_base_model_version"] == "sd_v1"
    rel = path.split("/loras/")[-1]
    stock = comfy_host.run_prompt({
        "ft": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": mini_sd15_full_ft_ckpt_name}},
        "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ft", 0], "clip": ["ft", 1], "lora_name": rel,
                                                        "strength_model": 1.0, "strength_clip": 1.0}},
        "m": host.capture(["lora", 0]), "c": host.capture(["lora", 1]),
    })
    ours_clip = comfy_host.patched_weights(v["t_clip"].patcher, TE_KEYS)
    stock_clip = comfy_host.patched_weights(stock["c"]["value"][0].patcher, TE_KEYS)
    for k in TE_KEYS:
        assert rel_err(stock_clip[k], ours_clip[k]) < 1e-5, k
    unet_keys = ["diffusion_model." + k for k in UNET_KEYS]
    ours_model = comfy_host.patched_weights(v["t_model"], unet_keys)
    stock_model = comfy_host.patched_weights(stock["m"]["value"][0], unet_keys)
    for k in unet_keys:
        assert rel_err(stock_model[k], ours_model[k]) < 1e-5, k


def test_save_with_clip_in_default_float16_text_encoder_matches_stock_loader(
        comfy_host, pack, mini_sd15_full_ckpt_name, mini_sd15_full_ft_ckpt_name, te_lora):
    """ComfyUI's default CPU configuration (float16 text encoder), with only the target's CLIP
    connected (as in example_workflows/): the Transfer's CLIP and the stock LoraLoader with the
    saved file patch the same float16 weights with the same float32 arithmetic (the saved factors
    differ from the node's only by the baked strength), so they agree to float16 rounding: ≤ 1 ulp
    on any entry, and the two deltas agree to 1e-2 (a few entries flip by one ulp, each ulp being
    up to ~1e-3 of the entry, against a delta ~1e-2 of the weight)."""
    lora_name = te_lora[0]
    p = _graph(mini_sd15_full_ckpt_name, mini_sd15_full_ft_ckpt_name, lora_name, t=_transfer(source_clip=False))
    p["save"] = {"class_type": "LoraxSave", "inputs": {"transfer": ["t", 2], "filename_prefix": "lorax/with_te_fp16",
                                                       "bake_strength": True}}
    p["cap_path"] = host.capture(["save", 0])
    out = comfy_host.run_prompt(p)
    v = {k: d["value"][0] for k, d in out.items() if "value" in d}
    ft_clip = v["cap_ft_clip"]
    assert ft_clip.cond_stage_model.state_dict()[TE_KEYS[0]].dtype == torch.float16
    rows = {r["key"]: r for r in json.loads(v["t_json"])}
    assert all(rows[k]["decision"] == "transferred" for k in TE_KEYS)
    rel = v["cap_path"].split("/loras/")[-1]
    stock = comfy_host.run_prompt({
        "ft": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": mini_sd15_full_ft_ckpt_name}},
        "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ft", 0], "clip": ["ft", 1], "lora_name": rel,
                                                        "strength_model": 1.0, "strength_clip": 1.0}},
        "c": host.capture(["lora", 1]),
    })
    base = {k: t.double() for k, t in _te_state(ft_clip).items()}
    ours = comfy_host.patched_weights(v["t_clip"].patcher, TE_KEYS)
    theirs = comfy_host.patched_weights(stock["c"]["value"][0].patcher, TE_KEYS)
    for k in TE_KEYS:
        assert ours[k].dtype == theirs[k].dtype == torch.float16
        assert not torch.equal(ours[k], ft_clip.cond_stage_model.state_dict()[k]), k  # really patched
        ulp = torch.finfo(torch.float16).eps * ours[k].double().abs().clamp_min(2.0 ** -14)
        assert ((ours[k].double() - theirs[k].double()).abs() <= ulp).all(), k
        assert rel_err(theirs[k].double() - base[k], ours[k].double() - base[k]) < 1e-2, k


def test_transfer_without_clip_lists_text_encoder_modules_as_skipped(
        comfy_host, pack, mini_sd15_full_ckpt_name, mini_sd15_full_ft_ckpt_name, te_lora):
    """(ii) No CLIP connected: every text-encoder module of the adapter gets a row saying so,
    every UNet module is transferred, nothing else appears and nothing is silently dropped; the
    report says how many were skipped; the CLIP output is None; a saved file holds no TE keys."""
    lora_name, lora, factors = te_lora
    p = _graph(mini_sd15_full_ckpt_name, mini_sd15_full_ft_ckpt_name, lora_name, t=_transfer(source_clip=False,
                                                                                             clip=False))
    p["save"] = {"class_type": "LoraxSave", "inputs": {"transfer": ["t", 2], "filename_prefix": "lorax/no_te",
                                                       "bake_strength": True}}
    p["cap_path"] = host.capture(["save", 0])
    out = comfy_host.run_prompt(p)
    v = {k: d["value"][0] for k, d in out.items() if "value" in d}
    rows = json.loads(v["t_json"])
    te_names = {host.te_lora_prefix(layer, m) for layer, m in TE_MODULES}
    unet_rows = {"diffusion_model." + k for k in UNET_KEYS}
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows) == len(te_names) + len(unet_rows)  # one row per adapter module
    assert set(by_key) == te_names | unet_rows
    assert {by_key[n]["decision"] for n in te_names} == {TE_SKIPPED}
    assert {by_key[k]["decision"] for k in unet_rows} == {"transferred"}
    report = v["t_handle"].report
    assert f"{len(te_names)} text-encoder modules skipped" in report and "connect the target's CLIP" in report
    assert out["t"]["text"][0] == report
    assert v["t_clip"] is None
    # Only the UNet was patched, and only on the adapter's layers.
    assert set(v["t_model"].patches) == unet_rows
    with safe_open(v["cap_path"], framework="pt") as f:
        saved = set(f.keys())
    assert saved and all(k.startswith("lora_unet_") for k in saved)
    assert json.loads(read_metadata(v["cap_path"])["lorax_provenance"])["text_encoder_skipped"] == len(te_names)


def test_source_clip_without_clip_still_lists_text_encoder_modules(
        comfy_host, pack, mini_sd15_full_ckpt_name, mini_sd15_full_ft_ckpt_name, te_lora):
    """Only ``source_clip`` connected (a wiring slip): the target's text encoder is unknown, so
    the text-encoder modules cannot be transferred -- they must still be listed as skipped."""
    p = _graph(mini_sd15_full_ckpt_name, mini_sd15_full_ft_ckpt_name, te_lora[0],
               t=_transfer(source_clip=True, clip=False))
    out = comfy_host.run_prompt(p)
    rows = json.loads(out["t_json"]["value"][0])
    te_names = {host.te_lora_prefix(layer, m) for layer, m in TE_MODULES}
    listed = {r["key"] for r in rows if r["decision"].startswith("skipped: text encoder")}
    assert len(listed) == len(te_names), [(r["key"], r["decision"]) for r in rows]
