"""LoRA-X files, kohya export, the per-layer transfer driver and the bad-input errors.

Numbers are checked against float64 references (tests/reference.py) at 1e-6 relative, the exact
path's acceptance bound; file round trips are bit-exact (float32 written, float32 read).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorax.delta import Delta
from lorax.engine import SVDEngine
from lorax.errors import LoraxError
from lorax.fingerprint import weight_sketch
from lorax.kohya_export import save_kohya_lora
from lorax.lorax_adapter import LoraxAdapter, load_lorax, save_lorax
from lorax.safetensors_io import load_tensors, read_metadata
from lorax.transfer import Decision, DictWeights, TransferSettings, similarity_table, transfer_deltas
from reference import lorax_ref, perturbed, power_law_matrix, rel_err, t, top_svd

EXACT_TOL = 1e-6



def _models(rng, strength=0.2):
    """A tiny source/target pair: two attention-like linears and a conv, target a fine-tune."""
    shapes = {"a.to_q.weight": (48, 48), "a.to_k.weight": (48, 64), "b.conv.weight": (32, 16, 3, 3)}
    src, tgt = {}, {}
    for key, shape in shapes.items():
        w = power_law_matrix(rng, shape[0], int(np.prod(shape[1:]))).reshape(shape)
        src[key] = t(w, torch.float32)
        tgt[key] = t(perturbed(rng, w, strength), torch.float32)
    return src, tgt


def _lora_deltas(rng, weights, r=4):
    out = {}
    for key, w in weights.items():
        m, n = w.shape[0], w[0].numel()
        out[key] = Delta.factored(w.shape, t(rng.standard_normal((m, r)) * 0.1), t(rng.standard_normal((r, n)) * 0.1))
    return out


def test_transfer_driver_matches_reference_and_reports(rng):
    src, tgt = _models(rng)
    deltas = _lora_deltas(rng, src)
    deltas["missing.weight"] = Delta.factored((8, 8), torch.ones(8, 1), torch.ones(1, 8))
    settings = TransferSettings(rank=8, threshold=0.0, mode="lorax")
    result = transfer_deltas(deltas, DictWeights(src), DictWeights(tgt), settings, SVDEngine(method="exact"))
    by_key = {l.key: l for l in result.layers}
    assert by_key["missing.weight"].decision is Decision.MISSING_IN_TARGET
    for key in src:
        layer = by_key[key]
        assert layer.decision is Decision.TRANSFERRED, layer.note
        m = src[key].shape[0]
        Ut, _, Vt = top_svd(tgt[key].double().reshape(m, -1).numpy(), 8)
        dW = deltas[key].matrix().double().numpy()
        ref = lorax_ref(dW, Ut, Vt)
        assert rel_err(layer.delta.matrix(), ref) < EXACT_TOL
        assert abs(layer.energy_kept - np.linalg.norm(ref) / np.linalg.norm(dW)) < EXACT_TOL
        assert layer.delta.shape == tuple(src[key].shape)
    assert "3 of 4 layers transferred" in result.summary() and "1 missing in target" in result.summary()
    row = by_key["a.to_q.weight"].row()
    json.dumps(row)
    assert set(row) >= {"key", "phi", "phi_right", "phi_hat", "phi_hat_right", "decision", "energy_kept"}


def test_threshold_skips_unrelated_layers(rng):
    src, _ = _models(rng)
    unrelated = {k: t(power_law_matrix(rng, v.shape[0], v[0].numel()).reshape(v.shape), torch.float32)
                 for k, v in src.items()}
    deltas = _lora_deltas(rng, src)
    result = transfer_deltas(deltas, DictWeights(src), DictWeights(unrelated), TransferSettings(rank=8, threshold=0.3),
                             SVDEngine(method="exact"))
    for layer in result.layers:
        assert layer.decision is Decision.LOW_SIMILARITY
        assert layer.delta is None and abs(layer.similarity.phi_hat) < 0.3


def test_shape_mismatch_is_skipped_unless_paired(rng):
    src = {"x.weight": t(power_law_matrix(rng, 40, 24), torch.float32)}
    tgt = {"x.weight": t(power_law_matrix(rng, 56, 32), torch.float32)}
    deltas = _lora_deltas(rng, src)
    skip = transfer_deltas(deltas, DictWeights(src), DictWeights(tgt), TransferSettings(rank=8), SVDEngine())
    assert skip.layers[0].decision is Decision.SHAPE_MISMATCH and "paired" in skip.layers[0].note
    paired = transfer_deltas(deltas, DictWeights(src), DictWeights(tgt), TransferSettings(rank=8, shape_rule="paired"),
                             SVDEngine())
    assert paired.layers[0].decision is Decision.TRANSFERRED and paired.layers[0].delta.shape == (56, 32)


def test_default_rank_is_capped_at_half_the_layer():
    s = TransferSettings()
    assert s.rank_for((1280, 1280)) == 320
    assert s.rank_for((320, 768)) == 160
    assert s.rank_for((320, 320, 1, 1)) == 160
    assert s.rank_for((320, 768), adapter_rank=32) == 32
    assert TransferSettings(rank=640).rank_for((320, 768)) == 160
    assert TransferSettings(rank=64).rank_for((320, 768)) == 64


@pytest.mark.parametrize("kwargs,needle", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": None}, "rank must be a positive integer"),
    ({"threshold": 1.5}, "threshold must lie in [0, 1]"),
    ({"threshold": -0.1}, "threshold must lie in [0, 1]"),
    ({"mode": "magic"}, "unknown mode 'magic'"),
])
def test_bad_settings_are_rejected(kwargs, needle):
    with pytest.raises(LoraxError, match=None) as e:
        TransferSettings(**kwargs)
    assert needle in str(e.value)


def test_rank_larger_than_every_layer_is_an_error(rng):
    src, tgt = _models(rng)
    with pytest.raises(LoraxError) as e:
        transfer_deltas(_lora_deltas(rng, src), DictWeights(src), DictWeights(tgt), TransferSettings(rank=4096),
                        SVDEngine())
    assert "rank 4096 is larger than every layer" in str(e.value) and "at most 48" in str(e.value)


def test_similarity_table_rows(rng):
    src, tgt = _models(rng, strength=0.05)
    rows = similarity_table(DictWeights(src), DictWeights(tgt), src.keys(), SVDEngine(method="exact"), rank=8)
    assert [r["phi"] for r in rows] == sorted(r["phi"] for r in rows)
    for r in rows:
        assert {"key", "phi", "phi_right", "shape_source", "shape_target"} <= set(r)
        assert 0.9 < r["phi"] <= 1.0


def _adapter(rng, src, r=6):
    sigmas = {"lora_unet_" + k.replace(".weight", "").replace(".", "_"): torch.from_numpy(rng.standard_normal(r)).float()
              for k in src}
    sketches = {"lora_unet_" + k.replace(".weight", "").replace(".", "_"): weight_sketch(w) for k, w in src.items()}
    return LoraxAdapter(sigmas=sigmas, sketches=sketches, metadata={"lorax_source": "unit"})


def test_lorax_file_round_trip(tmp_path, rng):
    src, _ = _models(rng)
    adapter = _adapter(rng, src)
    path = tmp_path / "style.safetensors"
    save_lorax(path, adapter, metadata={"ss_base_model_version": "sd_v1"})
    back = load_lorax(path)
    assert back.sigmas.keys() == adapter.sigmas.keys()
    for k in adapter.sigmas:
        assert torch.equal(back.sigmas[k], adapter.sigmas[k])
        assert torch.equal(back.sketches[k], adapter.sketches[k])
    meta = read_metadata(path)
    assert meta["lorax_version"] == "1" and meta["lorax_rank"] == "6" and meta["ss_base_model_version"] == "sd_v1"
    assert back.source_fingerprint == adapter.source_fingerprint
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_lorax_source_check_accepts_fp16_copy_and_rejects_other_model(rng):
    # A light fine-tune: 2 % relative change, the order of a real style fine-tune of SD.
    src, tgt = _models(rng, strength=0.02)
    adapter = _adapter(rng, src)
    for module, key in zip(adapter.sigmas, src):
        adapter.check_source(module, src[key])
        adapter.check_source(module, src[key].half())  # the same source re-saved in fp16/bf16 passes
        adapter.check_source(module, src[key].bfloat16())
        with pytest.raises(LoraxError) as e:
            adapter.check_source(module, tgt[key])
        assert "not the source this LoRA-X adapter was made for" in str(e.value) and module in str(e.value)


def test_lorax_rank_larger_than_layer_is_an_error(rng):
    adapter = LoraxAdapter(sigmas={"m": torch.ones(40)}, sketches={}, path="x.safetensors")
    with pytest.raises(LoraxError) as e:
        adapter.check_source("m", torch.randn(32, 16))
    assert "rank 40" in str(e.value) and "'m'" in str(e.value) and "x.safetensors" in str(e.value)


def test_lorax_delta_rebuilt_from_source(rng):
    w = power_law_matrix(rng, 48, 32)
    sigma = rng.standard_normal(5)
    adapter = LoraxAdapter(sigmas={"m": t(sigma, torch.float32)}, sketches={})
    f = SVDEngine(method="exact").factors(t(w), 5)
    U, S, V = top_svd(w, 5)
    # Reference in the library's sign convention: U diag(d) Vᵀ is sign-invariant per pair.
    assert rel_err(adapter.delta("m", f, (48, 32)).matrix(), (U * sigma) @ V.T) < EXACT_TOL


def test_lorax_adapter_moves_with_the_lorax_projection_in_either_mode(rng):
    """A LoRA-X delta lies in the source's top-r subspaces, so prolora's null-space part is zero:
    both modes give the lorax projection at the adapter's own rank r (not 2r)."""
    ws = power_law_matrix(rng, 48, 32)
    wt = perturbed(rng, ws, 0.05)
    r = 6
    U, _, V = top_svd(ws, r)
    delta = Delta.factored((48, 32), t(U * rng.standard_normal(r)), t(V.T))
    Ut, _, Vt = top_svd(wt, r)
    ref = lorax_ref(delta.matrix().numpy(), Ut, Vt)
    for mode in ("lorax", "prolora"):
        res = transfer_deltas({"m": delta}, DictWeights({"m": t(ws)}), DictWeights({"m": t(wt)}),
                              TransferSettings(threshold=0.0, mode=mode), SVDEngine(method="exact"),  # rank unused
                              adapter_ranks={"m": r})
        moved = res.deltas["m"]
        assert moved.rank == r and rel_err(moved.matrix(), ref) < EXACT_TOL, mode
    # An ordinary LoRA's delta, by contrast, keeps its null-space part in prolora (rank 2·rank).
    lora = Delta.factored((48, 32), t(rng.standard_normal((48, 3))), t(rng.standard_normal((3, 32))))
    res = transfer_deltas({"m": lora}, DictWeights({"m": t(ws)}), DictWeights({"m": t(wt)}),
                          TransferSettings(rank=r, threshold=0.0, mode="prolora"), SVDEngine(method="exact"))
    assert res.deltas["m"].rank == 6


def test_auto_copies_layers_that_barely_moved_without_an_svd_and_transports_the_rest(rng):
    """``auto`` (the default): a layer whose target weight lies within ``copy_below`` of the source's norm
    gets the adapter's own delta and no decomposition; a farther one is transported (``R_U ΔW R_Vᵀ``, the
    float64 reference of tests/reference.py). The measured change is ‖W_t − W_s‖/‖W_s‖ (float64, 1e-12)."""
    from reference import transport_ref

    ws = {n: power_law_matrix(rng, 48, 40) for n in ("near", "far", "same")}
    wt = {"near": perturbed(rng, ws["near"], 0.05), "far": perturbed(rng, ws["far"], 0.6), "same": ws["same"]}
    deltas = {n: Delta.factored((48, 40), t(rng.standard_normal((48, 3))), t(rng.standard_normal((3, 40))))
              for n in ws}
    engine = SVDEngine(method="exact")
    res = transfer_deltas(deltas, DictWeights({n: t(w) for n, w in ws.items()}),
                          DictWeights({n: t(w) for n, w in wt.items()}), TransferSettings(rank=8, threshold=0.0),
                          engine)
    assert res.settings.mode == "auto"
    by = {l.key: l for l in res.layers}
    assert {n: by[n].how for n in ws} == {"near": "copied", "far": "transported", "same": "copied"}
    assert engine.stats.layers_decomposed == 2  # the far layer's source and target only
    for n in ("near", "same"):
        assert torch.equal(res.deltas[n].up, deltas[n].up.float()) and by[n].cosine == 1.0
    for n in ("near", "far"):
        change = np.linalg.norm(wt[n] - ws[n]) / np.linalg.norm(ws[n])
        assert abs(by[n].weight_change - change) < 1e-12 * change, n
    assert by["same"].weight_change == 0.0
    Us, _, Vs = top_svd(ws["far"], 8)
    Ut, _, Vt = top_svd(wt["far"], 8)
    ref = transport_ref(deltas["far"].matrix().numpy(), Us, Vs, Ut, Vt)
    assert rel_err(res.deltas["far"].matrix(), ref) < EXACT_TOL
    assert abs(by["far"].energy_kept - 1) < EXACT_TOL  # a rotation keeps the norm
    assert by["far"].cosine == pytest.approx(float(np.sum(ref * deltas["far"].matrix().numpy())) /
                                             (np.linalg.norm(ref) * deltas["far"].norm()), rel=1e-9)
    assert "(2 copied, 1 transported)" in res.summary()
    # copy: everything as it is, nothing decomposed; copy_below 0: only identical layers are copied.
    engine = SVDEngine(method="exact")
    res = transfer_deltas(deltas, DictWeights({n: t(w) for n, w in ws.items()}),
                          DictWeights({n: t(w) for n, w in wt.items()}), TransferSettings(mode="copy", rank=8), engine)
    assert {l.how for l in res.layers} == {"copied"} and engine.stats.layers_decomposed == 0
    res = transfer_deltas(deltas, DictWeights({n: t(w) for n, w in ws.items()}),
                          DictWeights({n: t(w) for n, w in wt.items()}),
                          TransferSettings(rank=8, threshold=0.0, copy_below=0.0), SVDEngine(method="exact"))
    assert {l.key: l.how for l in res.layers} == {"near": "transported", "far": "transported", "same": "copied"}


def test_transport_moves_a_lorax_delta_into_the_targets_subspaces_at_its_own_rank(rng):
    """A LoRA-X delta ``U_s,r diag(δ) V_s,rᵀ`` transported lands in the target's top-r subspaces (as the
    seed's projection would put it) with its norm whole, at rank r."""
    from reference import transport_ref

    ws = power_law_matrix(rng, 48, 32)
    wt = perturbed(rng, ws, 0.5)
    r = 6
    U, _, V = top_svd(ws, r)
    delta = Delta.factored((48, 32), t(U * rng.standard_normal(r)), t(V.T))
    res = transfer_deltas({"m": delta}, DictWeights({"m": t(ws)}), DictWeights({"m": t(wt)}),
                          TransferSettings(threshold=0.0, mode="transport"), SVDEngine(method="exact"),
                          adapter_ranks={"m": r})
    moved = res.deltas["m"]
    Ut, _, Vt = top_svd(wt, r)
    assert moved.rank == r and rel_err(moved.matrix(), transport_ref(delta.matrix().numpy(), U, V, Ut, Vt)) < EXACT_TOL
    assert rel_err(lorax_ref(moved.matrix().numpy(), Ut, Vt), moved.matrix()) < EXACT_TOL  # inside the target's
    assert abs(moved.norm() / delta.norm() - 1) < EXACT_TOL


def test_copy_below_is_validated():
    with pytest.raises(LoraxError, match="copy_below must be a share"):
        TransferSettings(copy_below=-0.1)
    with pytest.raises(LoraxError, match="unknown mode 'proj'; expected one of auto, copy, transport"):
        TransferSettings(mode="proj")


def test_kohya_export_round_trip(tmp_path, rng):
    src, _ = _models(rng)
    deltas = {"lora_unet_" + k[:-7].replace(".", "_"): d for k, d in _lora_deltas(rng, src).items()}
    deltas["dense_one"] = Delta.from_dense(t(rng.standard_normal((6, 2)) @ rng.standard_normal((2, 10)), torch.float32))
    path = tmp_path / "out.safetensors"
    meta = save_kohya_lora(path, deltas, base_model_version="sdxl_base_v1-0", architecture="stable-diffusion-xl-v1-base/lora",
                           provenance={"mode": "lorax"})
    tensors = load_tensors(path)
    for name, d in deltas.items():
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        alpha = float(tensors[f"{name}.alpha"])
        rank = down.shape[0]
        got = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)) * alpha / rank
        assert rel_err(got, d.matrix()) < 1e-5
        if len(d.shape) == 4:
            assert down.shape[1:] == d.shape[1:] and up.shape[2:] == (1, 1)
    assert tensors["dense_one.lora_down.weight"].shape[0] == 2  # factored at its numerical rank
    stored = read_metadata(path)
    assert stored["ss_base_model_version"] == "sdxl_base_v1-0" and json.loads(stored["lorax_provenance"])["mode"] == "lorax"
    assert meta == stored


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def test_bad_files_give_clear_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(LoraxError, match="file not found"):
        load_lorax(missing)
    pickle = tmp_path / "model.ckpt"
    _write(pickle, b"PK\x03\x04" + b"\x00" * 200)
    with pytest.raises(LoraxError) as e:
        load_tensors(pickle)
    assert "not a safetensors file" in str(e.value) and "model.ckpt" in str(e.value)
    good = tmp_path / "good.safetensors"
    save_file({"x.lora_up.weight": torch.ones(64, 64)}, str(good))
    cut = tmp_path / "cut.safetensors"
    _write(cut, good.read_bytes()[:-100])
    with pytest.raises(LoraxError) as e:
        load_tensors(cut)
    assert "truncated" in str(e.value) and "cut.safetensors" in str(e.value)
    nan = tmp_path / "nan.safetensors"
    save_file({"x.lora_up.weight": torch.tensor([[1.0, float("nan")]])}, str(nan))
    with pytest.raises(LoraxError) as e:
        load_tensors(nan)
    assert "NaN or inf" in str(e.value) and "x.lora_up.weight" in str(e.value)
    with pytest.raises(LoraxError, match="not a LoRA-X adapter"):
        load_lorax(good)


def test_failed_write_leaves_nothing(tmp_path, rng):
    """A write that fails half-way (here: NaN found) leaves neither the file nor a temp file."""
    path = tmp_path / "out.safetensors"
    bad = {"m": Delta.factored((4, 4), torch.full((4, 1), float("inf")), torch.ones(1, 4))}
    with pytest.raises(LoraxError):
        save_kohya_lora(path, bad)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"old")
    adapter = LoraxAdapter(sigmas={"m": torch.tensor([float("nan")])}, sketches={})
    with pytest.raises(LoraxError):
        save_lorax(path, adapter)
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def _loader_reads(path) -> bool:
    """Whether the safetensors binding itself opens the file and reads every tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:  # its own error types (SafetensorError, …)
        return False


def test_header_check_agrees_with_the_safetensors_loader(tmp_path):
    """The container check refuses exactly the files the safetensors loader cannot read, over
    tests/damage.py's mutations of a kohya LoRA (rules and random flips/truncations): no damaged
    container reaches the loader, no readable file is refused. The LoRA-level damage (valid
    containers) is then caught by the factor check, each with the file and key named."""
    import damage
    from lorax.adapter_check import check_adapter_file
    from lorax.safetensors_io import check_safetensors_file

    g = torch.Generator().manual_seed(3)
    lora = {}
    for i, (m, n) in enumerate([(32, 48), (64, 32), (16, 16)]):
        lora[f"lora_unet_m{i}.lora_up.weight"] = torch.randn(m, 4, generator=g)
        lora[f"lora_unet_m{i}.lora_down.weight"] = torch.randn(4, n, generator=g).half()
        lora[f"lora_unet_m{i}.alpha"] = torch.tensor(2.0)
    good = tmp_path / "good.safetensors"
    save_file(lora, str(good), metadata={"ss_network_dim": "4"})
    container_damage = factor_damage = 0
    for i, m in enumerate(damage.mutations(good.read_bytes())):
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(m.data)
        try:
            check_safetensors_file(path)
            ours = True
        except LoraxError as e:
            ours = False
            assert str(path) in str(e) and len(str(e).splitlines()) == 1, m.kind
        assert ours == _loader_reads(path), (m.kind, ours)
        if not ours:
            container_damage += 1
            continue
        try:
            check_adapter_file(path)
            load_tensors(path)
        except LoraxError as e:
            assert all(n in str(e) for n in m.needles) and (m.key is None or m.key in str(e)), (m.kind, str(e))
            factor_damage += 1
        else:
            assert not m.must_refuse, m.kind
    assert container_damage >= 15 and factor_damage >= 5


def test_header_check_accepts_every_valid_container(tmp_path):
    """Every dtype torch and safetensors share, empty tensors, metadata, the PEFT and LoCon namings:
    accepted by both checks (no false alarm on a file the loader reads)."""
    from lorax.adapter_check import check_adapter_file
    from lorax.safetensors_io import check_safetensors_file

    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
    tensors = {f"t{i}": torch.ones(3, 5).to(d) for i, d in enumerate(dtypes)}
    tensors["empty"] = torch.zeros(0, 7)
    tensors["scalar"] = torch.tensor(1.5)
    tensors["peft.lora_A.weight"], tensors["peft.lora_B.weight"] = torch.ones(4, 9), torch.ones(6, 4)
    tensors["locon.lora_down.weight"], tensors["locon.lora_up.weight"] = torch.ones(4, 8, 1, 1), torch.ones(5, 4, 1, 1)
    tensors["locon.lora_mid.weight"] = torch.ones(4, 4, 3, 3)
    path = tmp_path / "valid.safetensors"
    save_file(tensors, str(path), metadata={"a": "b"})
    assert _loader_reads(path)
    header = check_safetensors_file(path)
    check_adapter_file(path)
    assert set(header) - {"__metadata__"} == set(tensors)
    assert load_tensors(path)["empty"].shape == (0, 7)
