"""Transfers between models whose layers do not line up, through the nodes on the real host.

* SDXL → SSD-1B: the target keeps 4 of the 10 transformer blocks of ``input_blocks.7.1`` and
  ``input_blocks.8.1`` as perturbed copies (10 % drift), renumbered 0–3 — the way SSD-1B is
  derived from SDXL — and ComfyUI itself detects the two files as ``SDXL`` and ``SSD1B``. The
  layer map must find the kept blocks, and the patches must be the projections of the deltas of
  the blocks they came from.
* SD1.5 → SDXL: every width and the text-conditioning size differ. The transfer must finish
  and say per layer family why layers stay behind (or, with the paired shape rule, move them by
  the documented rule) — never a shape error from inside torch.

Weights are float8 (the models have ~1.3 B and ~0.9 B parameters, see ``tests/cheap_unets.py``),
loaded with UNETLoader's ``fp8_e4m3fn`` option, so the pack also reads fp8 weights here.
Tolerances: the patches are float32 factors from float32-stored singular vectors; near the cut
k the power-law spectrum has relative gaps of ~0.25 %, which amplifies float32 rounding (~6e-8)
to ~1e-5 in the projected delta; the engine rounds U and V to float16 (the SVD cache's precision,
~4e-4), hence reference.HALF_FACTOR_TOL (gram route; 1e-4 before). The paired-rule check runs the
``exact`` float64 route, where only float32 patch storage remains: 1e-6.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import host
import cheap_unets as unets
from reference import HALF_FACTOR_TOL, lorax_ref, paired_ref, rel_err, top_svd

KEPT = {"input_blocks.7.1": [0, 3, 6, 9], "input_blocks.8.1": [1, 4, 5, 8]}
LAYERS = ("attn1.to_q", "attn2.to_k")


@pytest.fixture(scope="module")
def pack(comfy_host):
    comfy_host.load_pack(host.REPO_ROOT)
    return comfy_host.pack_module(host.REPO_ROOT)


@pytest.fixture(scope="module")
def sdxl_files(comfy_host):
    bank = unets.PowerLawBank(seed=3)
    teacher = unets.build_sdxl_family_unet(unets.SDXL_DEPTH, bank=bank)
    student = unets.distill(teacher, KEPT, unets.SSD1B_DEPTH, seed=4)
    names = comfy_host.save_unet(teacher, "mini_sdxl_fp8.safetensors"), comfy_host.save_unet(student, "mini_ssd1b_fp8.safetensors")
    keys = [unets.transformer_block_key(t, b, layer) for t in KEPT for b in range(10) for layer in LAYERS]
    kept_weights = {k: v.float() for k, v in student.items() if any(k.endswith(layer + ".weight") for layer in LAYERS)}
    return names, {k: teacher[k].float() for k in keys}, kept_weights


@pytest.fixture(scope="module")
def executor(comfy_host):
    return comfy_host.new_executor()  # keeps the loaded models between the graphs of this module


def _lora(comfy_host, source: dict, name: str, rank: int = 4, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    factors = {k: (torch.randn(w.shape[0], rank, generator=g) * 0.05, torch.randn(rank, w.shape[1], generator=g) * 0.05)
               for k, w in source.items()}
    return comfy_host.save_lora(host.make_kohya_lora(factors, alpha=float(rank)), name), factors


def _graph(src: str, tgt: str, lora: str, dtype: str = "default", **settings) -> dict:
    inputs = {"source_model": ["src", 0], "target_model": ["tgt", 0], "adapter": ["load", 1], "strength": 1.0,
              "rank": 320, "threshold": 0.3, "mode": "lorax", "exact": False}
    inputs.update(settings)
    return {
        "src": {"class_type": "UNETLoader", "inputs": {"unet_name": src, "weight_dtype": dtype}},
        "tgt": {"class_type": "UNETLoader", "inputs": {"unet_name": tgt, "weight_dtype": "fp8_e4m3fn"}},
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": lora, "strength": 1.0}},
        "transfer": {"class_type": "LoraxTransfer", "inputs": inputs},
        "cap_src": host.capture(["src", 0]), "cap_tgt": host.capture(["tgt", 0]),
        "cap_model": host.capture(["transfer", 0]), "cap_handle": host.capture(["transfer", 2]),
    }


def _patch_delta(model, key: str) -> torch.Tensor:
    """ΔW of the one low-rank patch the pack put on ``key`` (ComfyUI's patch list entry)."""
    (entry,) = model.patches[key]
    strength, adapter = entry[0], entry[1]
    up, down = adapter.weights[0], adapter.weights[1]
    return strength * (up.double() @ down.double())


def test_sdxl_to_ssd1b_through_the_nodes_follows_the_kept_blocks(comfy_host, pack, sdxl_files, executor):
    (src, tgt), teacher, student = sdxl_files
    lora, factors = _lora(comfy_host, teacher, "sdxl_style.safetensors")
    out = comfy_host.run_prompt(_graph(src, tgt, lora, dtype="fp8_e4m3fn"), executor=executor)
    model, src_model, tgt_model, handle = (out[k]["value"][0] for k in ("cap_model", "cap_src", "cap_tgt", "cap_handle"))
    bridge = pack.nodes.bridge
    assert bridge.model_kind(src_model) == "SDXL" and bridge.model_kind(tgt_model) == "SSD1B"

    moved = {layer.target: layer for layer in handle.result.layers if layer.decision.value == "transferred"}
    assert len(moved) == sum(len(b) for b in KEPT.values()) * len(LAYERS)
    for transformer, blocks in KEPT.items():
        for j, b in enumerate(blocks):
            for name in LAYERS:
                t_key = "diffusion_model." + unets.transformer_block_key(transformer, j, name)
                s_key = "diffusion_model." + unets.transformer_block_key(transformer, b, name)
                assert moved[t_key].key == s_key  # the map found the block it was distilled from
                assert moved[t_key].similarity.phi_hat_min > 0.5
                up, down = factors[s_key[len("diffusion_model."):]]
                k = moved[t_key].rank
                Ut, _, Vt = top_svd(student[t_key[len("diffusion_model."):]].double().numpy(), k)
                ref = lorax_ref((up.double() @ down.double()).numpy(), Ut, Vt)
                assert rel_err(_patch_delta(model, t_key), ref) < HALF_FACTOR_TOL, t_key
    dropped = [layer for layer in handle.result.layers if layer.decision.value == "missing in target"]
    assert len(dropped) == (20 - 8) * len(LAYERS) and all("no target layer is mapped" in l.note for l in dropped)
    assert "16 by similarity" in handle.report and "layer map:" in handle.report
    # The inputs are untouched.
    assert not src_model.patches and not tgt_model.patches

    # By name alone, target block j would take source block j: right only where KEPT[j] == j,
    # and Φ̂ rejects the rest.
    by_name = comfy_host.run_prompt(_graph(src, tgt, lora, dtype="fp8_e4m3fn", layer_map="name"),
                                    executor=executor)["cap_handle"]["value"][0]
    compared = [l for l in by_name.result.layers if l.similarity is not None]
    assert len(compared) == 8 * len(LAYERS)
    for layer in compared:
        transformer, rest = layer.key[len("diffusion_model."):].split(".transformer_blocks.")
        j = int(rest.split(".")[0])
        right = KEPT[transformer][j] == j
        assert (layer.decision.value == "transferred") == right, layer.key


@pytest.fixture(scope="module")
def sd15_source(comfy_host):
    # SD1.5's own block numbering for its first two levels: attention in input_blocks 1, 2 (320 wide)
    # and 4, 5 (640 wide), as in the real model; ComfyUI detects it as SD15.
    layout = host.unet_layout(model_channels=320, channel_mult=(1, 2), num_res_blocks=2, transformer_depth=(1, 1),
                              context_dim=768, in_channels=4, out_channels=4)
    sd = unets.build_unet(layout, bank=unets.PowerLawBank(seed=8), dtype=torch.float16)
    return comfy_host.save_unet(sd, "mini_sd15_2res.safetensors"), sd


def test_sd15_to_sdxl_says_per_family_why_layers_stay_behind(comfy_host, pack, sdxl_files, sd15_source, executor):
    sd15_name, sd15 = sd15_source
    adapted = {k: v for k, v in sd15.items()
               if ".transformer_blocks." in k and k.endswith(("attn1.to_q.weight", "attn2.to_k.weight",
                                                             "attn2.to_v.weight", "attn2.to_out.0.weight"))}
    lora, factors = _lora(comfy_host, adapted, "sd15_style.safetensors", seed=6)
    sdxl_file = sdxl_files[0][0]
    out = comfy_host.run_prompt(_graph(sd15_name, sdxl_file, lora), executor=executor)
    handle = out["cap_handle"]["value"][0]
    assert handle.target_kind == "SDXL"
    decisions = {l.decision.value for l in handle.result.layers}
    assert "transferred" not in decisions and len(handle.result.layers) == len(adapted)
    report = handle.report
    lines = [line.strip() for line in report.splitlines()[:40] if line.startswith("  ")]
    # One line per layer family with its counts and reasons — not one line per layer.
    by_family = {line.split(":", 1)[0]: line for line in lines if " left out: " in line}
    assert set(by_family) == {"attn1.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out"}, lines
    assert sum(int(line.split(" left out: ")[0].split(": ")[1]) for line in by_family.values()) == len(adapted)
    for family in ("attn2.to_k", "attn2.to_v"):
        assert "(the text-conditioning width differs, 768 → 2048: they read another text encoder's features)" \
            in by_family[family]
    assert "with no counterpart in the target" in by_family["attn1.to_q"]  # the 320-wide input blocks
    assert "(the layer widths differ)" in by_family["attn1.to_q"]            # 640 → 1280, 320 → 640
    assert "below the similarity threshold (median Φ̂ " in by_family["attn1.to_q"]  # unrelated 640-wide blocks
    assert any(line.startswith("Shape rule 'paired' would move the layers whose shapes differ") for line in lines)

    # The documented rule instead: singular directions paired by index (exact route, float64 factors).
    paired = comfy_host.run_prompt(_graph(sd15_name, sdxl_file, lora, shape_rule="paired", exact=True),
                                   executor=executor)
    model, handle = paired["cap_model"]["value"][0], paired["cap_handle"]["value"][0]
    kv = [l for l in handle.result.layers if l.decision.value == "transferred" and "attn2.to_k" in l.key]
    assert kv and all(tuple(l.shape_target) != tuple(l.shape_source) for l in kv)
    assert "attn2.to_k: 9 transferred across shapes by the paired rule" in handle.report
    layer = kv[0]
    s_key = layer.key[len("diffusion_model."):]
    up, down = factors[s_key]
    w_t = model.model.diffusion_model.state_dict()[layer.target[len("diffusion_model."):]].double().numpy()
    Us, _, Vs = _canonical(*top_svd(sd15[s_key].double().numpy(), layer.rank))
    Ut, _, Vt = _canonical(*top_svd(w_t, layer.rank))
    ref = paired_ref((up.double() @ down.double()).numpy(), Us, Vs, Ut, Vt)
    assert rel_err(_patch_delta(model, layer.target), ref) < 1e-6

    # And cross-attention k/v can be left out altogether.
    off = comfy_host.run_prompt(_graph(sd15_name, sdxl_file, lora, cross_attention_kv=False),
                                executor=executor)["cap_handle"]["value"][0]
    kv_off = [l for l in off.result.layers if l.key.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
              and l.shape_target is not None]
    assert kv_off and all(l.decision.value == "skipped: cross-attention k/v turned off" for l in kv_off)
    assert "cross-attention k/v transfer is turned off" in off.report


def _canonical(U, S, V):
    """The library's documented sign convention: the largest-magnitude entry of each left vector > 0."""
    idx = np.abs(U).argmax(axis=0)
    signs = np.sign(U[idx, np.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs, S, V * signs


# BK-SDM style: SD1.5 with one of the two res blocks per level removed (and its attention); ComfyUI
# renumbers the blocks, so the student's input_blocks.1 is what was the teacher's input_blocks.2.
_BK_SDM_FROM = {"input_blocks.1.": "input_blocks.2.", "input_blocks.2.": "input_blocks.3.",
                "input_blocks.3.": "input_blocks.5.", "output_blocks.1.": "output_blocks.2.",
                "output_blocks.2.": "output_blocks.3.", "output_blocks.3.": "output_blocks.5."}


def _sd15_layout(num_res_blocks: int):
    return host.unet_layout(model_channels=320, channel_mult=(1, 2), num_res_blocks=num_res_blocks,
                            transformer_depth=(1, 1), context_dim=768, in_channels=4, out_channels=4)


@pytest.fixture(scope="module")
def bk_sdm_files(comfy_host):
    teacher = unets.build_unet(_sd15_layout(2), bank=unets.PowerLawBank(seed=21), dtype=torch.float16,
                               content=unets.TRANSFORMER_LINEARS)

    def copied_from(key):
        prefix = next((p for p in _BK_SDM_FROM if key.startswith(p)), None)
        return None if prefix is None else _BK_SDM_FROM[prefix] + key[len(prefix):]

    student = unets.derive(teacher, _sd15_layout(1), copied_from, seed=22, dtype=torch.float16,
                           content=unets.TRANSFORMER_LINEARS)
    return (comfy_host.save_unet(teacher, "mini_sd15_teacher.safetensors"),
            comfy_host.save_unet(student, "mini_bk_sdm.safetensors"))


def _similarity(src, tgt, **options):
    inputs = {"source_model": ["src", 0], "target_model": ["tgt", 0], "rank": 64,
              "layers": "adapted by LoRAs (attention, feed-forward, proj)", "threshold": 0.3, **options}
    return {"src": {"class_type": "UNETLoader", "inputs": {"unet_name": src, "weight_dtype": "default"}},
            "tgt": {"class_type": "UNETLoader", "inputs": {"unet_name": tgt, "weight_dtype": "default"}},
            "sim": {"class_type": "LoraxSimilarityReport", "inputs": inputs}, "js": host.capture(["sim", 2])}


def test_similarity_report_compares_what_a_bk_sdm_student_kept(comfy_host, pack, bk_sdm_files, executor):
    teacher, student = bk_sdm_files
    out = comfy_host.run_prompt(_similarity(teacher, student), executor=executor)
    rows = {r["key"]: r for r in json.loads(out["js"]["value"][0])}
    text = out["sim"]["text"][0]
    assert "layer map:" in text and "by similarity" in text
    q = "diffusion_model.{}.1.transformer_blocks.0.attn1.to_q.weight"
    for student_block, teacher_block in (("input_blocks.1", "input_blocks.2"), ("input_blocks.3", "input_blocks.5"),
                                         ("output_blocks.1", "output_blocks.2"), ("output_blocks.3", "output_blocks.5"),
                                         ("middle_block", "middle_block")):
        row = rows[q.format(student_block)]
        assert row["source_key"] == q.format(teacher_block) and row["phi_hat"] > 0.5, row
    assert all(r["decision"] == "passes threshold" for r in rows.values())  # every kept layer is found

    # By name, input_blocks.1 is compared with the teacher's input_blocks.1, which it is not.
    by_name = comfy_host.run_prompt(_similarity(teacher, student, layer_map="name"), executor=executor)
    named = {r["key"]: r for r in json.loads(by_name["js"]["value"][0])}
    assert named[q.format("input_blocks.1")]["source_key"] == q.format("input_blocks.1")
    assert named[q.format("input_blocks.1")]["phi_hat"] < 0.1

    # A user map overrides the mode for the layers it names.
    user = json.dumps({q.format("input_blocks.1"): q.format("input_blocks.1")})
    mapped = comfy_host.run_prompt(_similarity(teacher, student, layer_map_json=user), executor=executor)
    rows = {r["key"]: r for r in json.loads(mapped["js"]["value"][0])}
    assert rows[q.format("input_blocks.1")]["source_key"] == q.format("input_blocks.1")
    assert rows[q.format("input_blocks.3")]["source_key"] == q.format("input_blocks.5")

    with pytest.raises(AssertionError) as e:
        comfy_host.run_prompt(_similarity(teacher, student, layer_map_json="{not json"), executor=executor)
    assert "layer_map_json input: the layer map is not valid JSON" in str(e.value)
    with pytest.raises(AssertionError) as e:
        comfy_host.run_prompt(_similarity(teacher, student, layer_map_json='{"nope.weight": "x.weight"}'),
                              executor=executor)
    assert "target model does not have" in str(e.value) and "nope.weight" in str(e.value)
