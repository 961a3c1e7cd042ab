"""Quantized weights read as the matrix the model computes with (lorax.weight_formats), the float64
device decision (lorax.devices), and no autograd anywhere in the library's math.

Quantized tensors are made by the real libraries: comfy-kitchen (the quantization library current
ComfyUI uses; its ``QuantizedTensor`` is the host's) for every layout it can quantize on a CPU,
and the ``gguf`` package for GGUF types (quantized where it can, valid crafted blocks for the
K-quant and IQ types it only dequantizes; tests/gguf_standin.py says why the tensor wrapper is
ours in CI).

Tolerances:
* the matrix the pack reads equals the layout's own dequantization to 1e-6 relative (it *is* that
  dequantization; float32 rounding of a float64 comparison is ~1e-7);
* a transfer onto a quantized target equals the transfer onto its dequantized twin to 1e-5
  relative: both decompose the same float32 matrix, so only the order of float32 operations may
  differ before the engine rounds both to the same float16 vectors;
* both agree with the float64 reference (tests/reference.py: full numpy-side SVD of the same
  dequantized matrix) to reference.HALF_FACTOR_TOL (1.5e-3), the accuracy of the engine's float16
  singular vectors (SVD cache v2; the tolerance's comment there says how it was measured).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from gguf_standin import crafted_tensor, packed_tensor
from lorax.delta import Delta
from lorax.devices import float64_device, has_float64
from lorax.engine import SVDEngine
from lorax.transfer import DictWeights, TransferSettings, transfer_deltas
from lorax.weight_formats import UnreadableWeight, dense_weight, logical_shape, weight_format
from reference import HALF_FACTOR_TOL, lorax_ref, power_law_matrix, rel_err, top_svd

ck = pytest.importorskip("comfy_kitchen.tensor", reason="comfy-kitchen is in requirements-dev.txt")
gguf = pytest.importorskip("gguf", reason="gguf is in requirements-dev.txt")
Q = gguf.GGMLQuantizationType

#: Every comfy-kitchen layout that quantizes on a CPU (checked: comfy-kitchen 0.2.40). AWQ W4A16
#: and SVDQuant W4A4 need offline calibration (their from_float raises) and are read the same way.
CK_LAYOUTS = ["TensorCoreFP8Layout", "TensorCoreMXFP8Layout", "TensorCoreNVFP4Layout", "TensorWiseINT8Layout",
              "TensorCoreConvRotW4A4Layout", "AsymW4A8Int8Layout"]
#: GGUF types the gguf package quantizes, and those it only dequantizes (crafted blocks).
GGUF_QUANTIZED = [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.TQ1_0, Q.TQ2_0, Q.MXFP4]
GGUF_CRAFTED = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S,
                Q.IQ1_S, Q.IQ1_M, Q.IQ4_NL, Q.IQ4_XS]

M, N = 128, 512  # divisible by every block size above (32, 256) and by NVFP4/MXFP8 tiles


def _weights(rng, dtype=torch.float32):
    ws = power_law_matrix(rng, M, N)
    return torch.from_numpy(ws).to(dtype)


@pytest.mark.parametrize("layout", CK_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_comfy_kitchen_layouts_read_as_their_own_dequantization(layout, dtype, rng):
    w = _weights(rng, dtype)
    q = ck.QuantizedTensor.from_float(w, layout)
    got = dense_weight(q, key="diffusion_model.x.weight")
    want = q.dequantize()
    assert type(got) is torch.Tensor and not got.requires_grad
    assert tuple(got.shape) == (M, N) == logical_shape(q)
    assert rel_err(got.double().numpy(), want.double().numpy()) <= 1e-6
    assert layout in weight_format(q)


@pytest.mark.parametrize("qtype", GGUF_QUANTIZED, ids=lambda q: q.name)
def test_gguf_types_read_as_the_gguf_packages_dequantization(qtype, rng):
    w = _weights(rng)
    t = packed_tensor(w, qtype)
    got = dense_weight(torch.nn.Parameter(t, requires_grad=False), key="diffusion_model.x.weight")
    raw = torch.Tensor.as_subclass(t, torch.Tensor).numpy()
    want = gguf.quants.dequantize(raw, qtype).reshape(M, N)
    assert type(got) is torch.Tensor and tuple(got.shape) == (M, N)
    assert rel_err(got.double().numpy(), want.astype(np.float64)) <= 1e-6
    # and it is the weight, within the type's quantization error (ternary TQ types keep the least:
    # cosine ≈ 0.57 with the original), never its bytes
    cosine = torch.nn.functional.cosine_similarity(got.double().reshape(1, -1), w.double().reshape(1, -1))
    assert float(cosine) > 0.5


@pytest.mark.parametrize("qtype", GGUF_CRAFTED, ids=lambda q: q.name)
def test_gguf_types_the_package_only_dequantizes(qtype):
    t = crafted_tensor((64, 512), qtype, seed=int(qtype))
    got = dense_weight(t, key="k")
    want = gguf.quants.dequantize(torch.Tensor.as_subclass(t, torch.Tensor).numpy(), qtype).reshape(64, 512)
    assert np.isfinite(want).all()
    assert rel_err(got.double().numpy(), want.astype(np.float64)) <= 1e-6


def test_gguf_is_dequantized_a_block_of_rows_at_a_time(monkeypatch, rng):
    """Blocks of rows are stitched in order (a seam inside the matrix)."""
    import lorax.weight_formats as wf

    monkeypatch.setattr(wf, "_GGUF_BLOCK_ELEMENTS", 3 * N)  # 3 rows a block: 43 blocks, a short last one
    w = _weights(rng)
    t = packed_tensor(w, Q.Q8_0)
    want = gguf.quants.dequantize(torch.Tensor.as_subclass(t, torch.Tensor).numpy(), Q.Q8_0)
    assert rel_err(dense_weight(t).double().numpy(), want.astype(np.float64)) <= 1e-6


def _transfer(target_weight, source, delta, key="diffusion_model.x.weight", rank=16):
    engine = SVDEngine(method="gram", workers=1)
    res = transfer_deltas({key: delta}, DictWeights({key: source}), DictWeights({key: target_weight}),
                          TransferSettings(rank=rank, threshold=0.0, mode="lorax"), engine)
    (layer,) = res.layers
    assert layer.delta is not None, layer
    return layer.delta.matrix().double().numpy()


@pytest.mark.parametrize("fmt", ["TensorCoreNVFP4Layout", "TensorWiseINT8Layout", "TensorCoreMXFP8Layout", "Q4_0", "Q8_0"])
def test_transfer_onto_a_quantized_target_equals_its_dequantized_twin(fmt, rng):
    ws = power_law_matrix(rng, M, N)
    wt = ws + 0.05 * power_law_matrix(rng, M, N)
    source = torch.from_numpy(ws).float()
    tgt = torch.from_numpy(wt).float()
    quantized = ck.QuantizedTensor.from_float(tgt, fmt) if fmt.endswith("Layout") else packed_tensor(tgt, Q[fmt])
    twin = dense_weight(quantized).clone()
    b = rng.standard_normal((M, 4)) * 0.05
    a = rng.standard_normal((4, N)) * 0.05
    delta = Delta.factored((M, N), torch.from_numpy(b), torch.from_numpy(a))
    on_quantized = _transfer(quantized, source, delta)
    on_twin = _transfer(twin, source, delta)
    assert rel_err(on_quantized, on_twin) <= 1e-5
    Ut, _, Vt = top_svd(twin.double().numpy(), 16)
    assert rel_err(on_quantized, lorax_ref(b @ a, Ut, Vt)) <= HALF_FACTOR_TOL


class _Opaque(torch.Tensor):
    """A tensor subclass nobody registered a dequantization for."""


def test_unknown_formats_are_refused_in_one_sentence():
    w = torch.zeros(8, 16)
    with pytest.raises(UnreadableWeight) as e:
        dense_weight(w.as_subclass(_Opaque), key="diffusion_model.a.weight")
    msg = str(e.value)
    assert "diffusion_model.a.weight" in msg and "_Opaque" in msg and "load the model" in msg
    with pytest.raises(UnreadableWeight, match=r"torch\.int8 of shape \(8, 16\): packed or integer storage"):
        dense_weight(torch.zeros(8, 16, dtype=torch.int8), key="k")
    # a GGUF tensor whose bytes do not add up to its claimed shape
    t = packed_tensor(torch.randn(8, 64), Q.Q8_0)
    t.tensor_shape = torch.Size((8, 128))
    with pytest.raises(UnreadableWeight, match=r"holds 544 bytes; a \(8, 128\) weight of that type needs 1088"):
        dense_weight(t, key="k")


def test_a_gguf_type_the_package_cannot_dequantize_is_refused():
    t = crafted_tensor((4, 256), Q.Q8_K)
    with pytest.raises(UnreadableWeight, match="GGUF Q8_K, which the installed gguf package .* cannot dequantize"):
        dense_weight(t, key="k")


def test_plain_weights_are_detached_views_that_stay_the_same_object():
    p = torch.nn.Parameter(torch.randn(8, 16))  # requires grad, as the CLI's loaders hand them out
    a, b = dense_weight(p), dense_weight(p)
    assert a is b and type(a) is torch.Tensor and not a.requires_grad
    assert a.data_ptr() == p.data_ptr()  # no copy
    fp8 = torch.randn(8, 16).to(torch.float8_e4m3fn)
    assert dense_weight(fp8) is fp8


# -- devices without float64 -----------------------------------------------------------------

def test_float64_work_leaves_devices_that_lack_it():
    never = lambda d: pytest.fail(f"probed {d} although its answer is known")  # noqa: E731
    assert float64_device("mps", probe=never) == torch.device("cpu")
    assert float64_device("privateuseone:0", probe=never) == torch.device("cpu")
    assert float64_device("cuda:1", probe=never) == torch.device("cuda:1")
    assert float64_device("cpu", probe=never) == torch.device("cpu")
    assert float64_device(None, probe=never) == torch.device("cpu")


def test_unknown_devices_are_probed_once(monkeypatch):
    import lorax.devices as devices

    monkeypatch.setattr(devices, "_PROBED", {})
    calls = []

    def probe(d):
        calls.append(d)
        return False

    assert not has_float64("xpu:0", probe=probe) and not has_float64("xpu:1", probe=probe)
    assert float64_device("xpu:0", probe=probe) == torch.device("cpu")
    assert len(calls) == 1
    monkeypatch.setattr(devices, "_PROBED", {})
    assert float64_device("xpu", probe=lambda d: True) == torch.device("xpu")


def test_an_engine_on_a_device_without_float64_decomposes_on_the_cpu():
    assert SVDEngine(method="gram", device="mps").device == torch.device("cpu")
    assert SVDEngine(method="exact", device="mps").requested_device == torch.device("mps")
    assert SVDEngine(method="randomized", device="mps").device == torch.device("mps")  # float32 route


# -- no autograd -----------------------------------------------------------------------------

def test_no_factor_or_delta_requires_grad_even_from_worker_threads(rng):
    """Weights that require grad (as ComfyUI's loaders hand them to the command line) go in; nothing
    that comes out records a graph — on the calling thread with grad enabled, and on the engine's
    worker threads, whose grad mode is their own."""
    keys = [f"diffusion_model.l{i}.weight" for i in range(4)]
    src = {k: torch.nn.Parameter(torch.from_numpy(power_law_matrix(rng, 64, 96)).float()) for k in keys}
    tgt = {k: torch.nn.Parameter(v.detach() + 0.01 * torch.randn(64, 96)) for k, v in src.items()}
    deltas = {k: Delta.factored((64, 96), torch.randn(64, 2, dtype=torch.float64, requires_grad=True),
                                torch.randn(2, 96, dtype=torch.float64)) for k in keys}
    seen = []
    engine = SVDEngine(method="gram", workers=2, max_batch_bytes=1 << 30)
    original = engine._decompose

    def spy(chunk):
        seen.append((threading.current_thread().name, torch.is_grad_enabled()))
        return original(chunk)

    engine._decompose = spy
    assert torch.is_grad_enabled()
    res = transfer_deltas(deltas, DictWeights(src), DictWeights(tgt), TransferSettings(rank=8, threshold=0.0), engine)
    assert any(name != threading.main_thread().name for name, _ in seen), seen  # workers did run
    for layer in res.layers:
        assert layer.delta is not None
        d = layer.delta
        assert not any(t.requires_grad for t in (d.up, d.down, d.dense) if t is not None)
    for factors in engine._memo.values():
        assert not any(x.requires_grad for x in (factors.U, factors.S, factors.V))
