"""Slices of fused weights (lorax/fused.py) and the compatibility verdict (lorax/verdict.py):
the pure library, no ComfyUI.

References are dense float64 numpy (tests/reference.py): a slice's transfer is checked against
``U Uᵀ ΔW V Vᵀ`` with U, V from ``numpy.linalg.svd`` of the target *slice*, and a merged fused
delta against the matrix built by writing each slice's dense delta into its rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorax.delta import Delta
from lorax.engine import SVDEngine
from lorax.fused import SlicedWeights, WeightSlice, base_key, host_key, merge_slices, parse_slice_key
from lorax.layer_map import LayerMap, LayerMatch
from lorax.report import block_of, family_of, family_sort_key, short_key, text_report
from lorax.transfer import Decision, DictWeights, TransferSettings, transfer_deltas
from lorax.verdict import Verdict, guess_architecture
from reference import HALF_FACTOR_TOL, lorax_ref, perturbed, power_law_matrix, rel_err, t, top_svd

QKV = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
LINEAR1 = "diffusion_model.single_blocks.3.linear1.weight"


@pytest.mark.parametrize("s,name", [
    (WeightSlice(QKV, 0, 0, 3072), QKV + "[0:3072]"),
    (WeightSlice(QKV, 0, 6144, 3072), QKV + "[6144:9216]"),
    (WeightSlice("a.b.weight", 1, 16, 8), "a.b.weight[:, 16:24]"),
])
def test_slice_keys_round_trip(s, name):
    assert s.name == name and parse_slice_key(name) == s and base_key(name) == s.key
    assert host_key(name) == (s.key, s.host_offset)


def test_plain_keys_are_not_slices():
    for key in (QKV, "x[3]", "x[5:5]", "x[a:b]", "diffusion_model.pos_embed"):
        assert parse_slice_key(key) is None and base_key(key) == key and host_key(key) == key


@pytest.mark.parametrize("key,start,size,part", [
    (QKV, 0, 3072, "q"), (QKV, 3072, 3072, "k"), (QKV, 6144, 3072, "v"),
    (LINEAR1, 0, 3072, "q"), (LINEAR1, 6144, 3072, "v"), (LINEAR1, 9216, 12288, "mlp"),
    ("diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", 128, 128, "k"),
    ("diffusion_model.double_blocks.0.img_mlp.0.weight", 0, 100, "rows 0:100"),
    (QKV, 100, 200, "rows 100:300"),
])
def test_slice_parts_follow_the_fused_layouts(key, start, size, part):
    assert WeightSlice(key, 0, start, size).part == part


def test_report_names_slices_and_dit_families():
    name = WeightSlice(LINEAR1, 0, 9216, 12288).name
    assert (block_of(name), family_of(name), short_key(name)) == \
        ("single_blocks.3", "linear1[mlp]", "single_blocks.3.linear1[9216:21504]")
    fams = ["img_attn.qkv[v]", "txt_attn.proj", "img_attn.qkv[q]", "img_mod", "img_attn.qkv", "img_attn.qkv[k]",
            "img_mlp.2"]
    assert sorted(fams, key=family_sort_key) == ["img_attn.qkv", "img_attn.qkv[q]", "img_attn.qkv[k]",
                                                 "img_attn.qkv[v]", "img_mlp.2", "img_mod", "txt_attn.proj"]
    sd3 = ["context_block.attn.qkv", "x_block.mlp.fc1", "x_block.attn.qkv", "context_block.adaLN_modulation"]
    assert sorted(sd3, key=family_sort_key) == ["x_block.attn.qkv", "x_block.mlp.fc1", "context_block.attn.qkv",
                                                "context_block.adaLN_modulation"]


def test_sliced_weights_answer_for_slices_with_views():
    w = torch.arange(60.0).reshape(12, 5)
    src = SlicedWeights(DictWeights({"w": w}))
    rows, cols = WeightSlice("w", 0, 4, 4).name, WeightSlice("w", 1, 1, 3).name
    assert src.shape(rows) == (4, 5) and src.shape(cols) == (12, 3) and src.shape("w") == (12, 5)
    assert torch.equal(src.weight(rows), w[4:8]) and src.weight(rows).data_ptr() == w[4].data_ptr()  # a view
    assert torch.equal(src.weight(cols), w[:, 1:4])
    assert src.shape(WeightSlice("w", 0, 10, 4).name) is None  # does not fit: rows 10..13 of 12
    assert src.shape(WeightSlice("missing", 0, 0, 1).name) is None
    assert src.identity(rows) is None  # DictWeights has no identity


def test_merge_slices_is_exact_and_low_rank(rng):
    m, n = 30, 7
    parts = {WeightSlice("w", 0, 0, 10): 2, WeightSlice("w", 0, 20, 10): 3}
    deltas = {s.name: Delta.factored((s.size, n), t(rng.standard_normal((s.size, r))), t(rng.standard_normal((r, n))))
              for s, r in parts.items()}
    dense_slice = WeightSlice("w", 0, 10, 5)
    deltas[dense_slice.name] = Delta.from_dense(t(power_law_matrix(rng, 5, n)))
    deltas["other"] = Delta.factored((4, 4), t(rng.standard_normal((4, 1))), t(rng.standard_normal((1, 4))))
    merged = merge_slices(deltas, {"w": (m, n)}.get)
    assert set(merged) == {"w", "other"} and merged["other"] is deltas["other"]
    expect = np.zeros((m, n))
    for name, d in deltas.items():
        s = parse_slice_key(name)
        if s is not None:
            expect[s.start:s.stop] = d.matrix().numpy()
    assert merged["w"].is_factored and merged["w"].shape == (m, n)
    assert rel_err(merged["w"].matrix(), expect) < 1e-12
    assert merged["w"].rank == 2 + 3 + 5  # the dense 5×7 slice factors at its numerical rank 5
    assert not merged["w"].matrix()[15:20].any()  # rows no slice touches stay exactly zero


def test_merge_adds_a_whole_weight_delta_and_column_slices(rng):
    full = Delta.factored((6, 8), t(rng.standard_normal((6, 2))), t(rng.standard_normal((2, 8))))
    col = WeightSlice("w", 1, 2, 3)
    d = Delta.factored((6, 3), t(rng.standard_normal((6, 1))), t(rng.standard_normal((1, 3))))
    merged = merge_slices({col.name: d, "w": full}, {"w": (6, 8)}.get)["w"]
    expect = full.matrix().numpy().copy()
    expect[:, 2:5] += d.matrix().numpy()
    assert rel_err(merged.matrix(), expect) < 1e-12


def test_merge_without_the_fused_weight_is_an_error():
    d = Delta.from_dense(torch.ones(2, 2))
    with pytest.raises(Exception, match="fused weight"):
        merge_slices({WeightSlice("gone", 0, 0, 2).name: d}, {}.get)


def _fused_pair(rng, h=48, n=40, strength=0.05):
    """A fused (3h × n) source weight and its fine-tuned target."""
    ws = np.concatenate([power_law_matrix(rng, h, n) for _ in range(3)])
    return ws, perturbed(rng, ws, strength)


def test_transfer_on_slices_equals_float64_reference_on_each_slice(rng):
    """Each slice is decomposed and projected on its own: U, V of the target *slice* (float64 numpy
    SVD). The Gram route in float64 on these well-conditioned 48 × 40 slices is accurate to
    ~1e-12, but the engine rounds U and V to float16 (the SVD cache's precision; measured 2–5e-4
    here), hence reference.HALF_FACTOR_TOL."""
    h, n, k = 48, 40, 8
    ws, wt = _fused_pair(rng, h, n)
    slices = [WeightSlice("qkv", 0, 0, h), WeightSlice("qkv", 0, 2 * h, h)]
    deltas = {s.name: Delta.factored((h, n), t(rng.standard_normal((h, 3)) * 0.1), t(rng.standard_normal((3, n))))
              for s in slices}
    res = transfer_deltas(deltas, DictWeights({"qkv": t(ws)}), DictWeights({"qkv": t(wt)}),
                          TransferSettings(rank=k, threshold=0.0, mode="lorax"), SVDEngine(method="gram"))
    assert [l.decision for l in res.layers] == [Decision.TRANSFERRED] * 2
    for s in slices:
        Ut, _, Vt = top_svd(wt[s.start:s.stop], k)
        ref = lorax_ref(deltas[s.name].matrix().numpy(), Ut, Vt)
        assert rel_err(res.deltas[s.name].matrix(), ref) < HALF_FACTOR_TOL, s.name
        # Not the projection onto the whole fused weight's subspaces (that would be another answer).
        Uf, _, Vf = top_svd(wt, k)
        padded = np.zeros_like(wt)
        padded[s.start:s.stop] = deltas[s.name].matrix().numpy()
        assert rel_err(res.deltas[s.name].matrix(), lorax_ref(padded, Uf, Vf)[s.start:s.stop]) > 1e-2
    row = res.layers[0].row()
    assert row["fused"] == "qkv" and row["slice"].startswith("rows 0–47 of the fused weight qkv")


def test_a_slice_follows_the_layer_map_of_its_fused_weight(rng):
    h, n = 16, 12
    ws, wt = _fused_pair(rng, h, n)
    s = WeightSlice("src.qkv", 0, h, h)
    deltas = {s.name: Delta.factored((h, n), t(rng.standard_normal((h, 2))), t(rng.standard_normal((2, n))))}
    lmap = LayerMap({"tgt.qkv": LayerMatch("tgt.qkv", "src.qkv", "user")})
    res = transfer_deltas(deltas, DictWeights({"src.qkv": t(ws)}), DictWeights({"tgt.qkv": t(wt)}),
                          TransferSettings(rank=4, threshold=0.0, mode="lorax"), SVDEngine(method="exact"), layer_map=lmap)
    assert list(res.deltas) == [s.on("tgt.qkv").name]
    Ut, _, Vt = top_svd(wt[h:2 * h], 4)
    # Exact float64 SVD; the result is stored as float32 factors, hence 1e-6.
    moved = res.deltas[s.on("tgt.qkv").name].matrix()
    assert rel_err(moved, lorax_ref(deltas[s.name].matrix().numpy(), Ut, Vt)) < 1e-6


def test_text_report_fits_long_family_names():
    rows = [{"key": WeightSlice("diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", 0, 0, 8).name,
             "phi": 0.9, "decision": "transferred"}]
    text = text_report(rows, title="t", threshold=0.3, verdict="Verdict: fits — x")
    lines = text.split("\n")
    assert lines[1] == "Verdict: fits — x"
    assert any("context_block.attn.qkv[q] " in line and "transferred" in line for line in lines)


# --------------------------------------------------------------------------------------------
# The verdict line
# --------------------------------------------------------------------------------------------

def test_verdict_fits():
    v = Verdict(target="FluxSchnell", modules=12, mapped=12, compared=12, passed=12, threshold=0.3)
    assert v.level == "fits"
    assert v.line() == ("Verdict: fits — all 12 adapter modules map onto layers of this FluxSchnell model; 12 of 12 "
                        "mapped layers (100 %) pass the similarity threshold (Φ̂ ≥ 0.3).")


def test_verdict_fits_partly_names_what_did_not_map():
    v = Verdict(target="SD3", modules=6, mapped=2, compared=2, passed=2, threshold=0.3,
                unmapped_example="lora_unet_joint_blocks_5_x_block_attn_qkv")
    assert v.level == "fits partly"
    assert v.line().startswith("Verdict: fits partly — 2 of 6 adapter modules (33 %) map onto layers of this SD3 "
                               "model (4 match none, e.g. lora_unet_joint_blocks_5_x_block_attn_qkv); 2 of 2")
    assert Verdict(target="SD3", modules=10, mapped=10, compared=10, passed=8, threshold=0.3).level == "fits partly"


def test_verdict_does_not_fit():
    none = Verdict(target="Flux", modules=192, mapped=0, architecture="SD1.x")
    assert none.level == "does not fit" and "\n" not in none.line()
    assert none.line().startswith("Verdict: does not fit — none of the adapter's 192 modules matches a layer of this "
                                  "Flux model: it was made for another architecture (its module names say SD1.x).")
    unrelated = Verdict(target="SD15", modules=4, mapped=4, compared=4, passed=0, threshold=0.3)
    assert unrelated.level == "does not fit" and "none of the 4 compared layers passes" in unrelated.line()


@pytest.mark.parametrize("names,shape,arch", [
    (["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"], (4, 768), "SD1.x"),
    (["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"], (4, 2048), "SDXL"),
    (["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"], (4, 1024), "SD2.x"),
    (["lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight"], (4, 1280), "SD1.x, SD2.x or SDXL"),
    # Chroma is Flux without the modulation layers: names without them could be either.
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], (4, 3072), "Flux.1 or Chroma"),
    (["transformer.single_transformer_blocks.3.proj_mlp.lora_A.weight"], (4, 3072), "Flux.1 or Chroma"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
      "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"], (4, 3072), "Flux"),
    (["transformer.single_transformer_blocks.3.norm.linear.lora_A.weight"], (4, 3072), "Flux"),
    (["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], (4, 1536), "SD3"),
    # What names alone cannot tell, widths and telltale modules do (lorax/families.py).
    (["transformer.blocks.0.attn2.add_k_proj.lora_A.weight"], (4, 5120), "Wan I2V"),  # diffusers' Wan names
    (["diffusion_model.layers.0.attention.to_q.lora_A.weight"], (4, 2304), "Lumina 2"),
    (["diffusion_model.layers.0.attention.to_q.lora_A.weight"], (4, 1024), "Z-Image or Lumina 2"),
    (["lora_unet_double_blocks_19_img_attn_qkv.lora_down.weight"], (4, 3072), "HunyuanVideo"),  # Flux.1 has 19
    (["lora_unet_distilled_guidance_layer_layers_0_in_layer.lora_down.weight",
      "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], (4, 3072), "Chroma"),
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], (4, 3072), None),  # Flux's or Qwen-Image's
    (["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], (4, 768), None),
])
def test_guess_architecture(names, shape, arch):
    assert guess_architecture({n: torch.zeros(shape) for n in names}) == arch
