"""LoRA-X training: the Δσ weight wrapper (pure torch) and the LoRA-X Train node on the real host.

The node test plants a known change: a teacher = source + U diag(Δσ*) Vᵀ on the self-attention
weights (exact float64 SVD), and distils it back into a LoRA-X adapter through ComfyUI's own
training loop (``TrainSampler`` + ``Guider_Basic`` + ``ModelPatcher`` weight wrappers).

Calibration of the planted problem (measured, this file's settings; 2-core CPU):

* r = 2 per layer, Δσ*ᵢ = 0.05·σᵢ·u with u ~ U(−1, 1); 40 Adam steps at lr 0.05 (a step moves a
  Δσ by ≲ 0.05, the largest Δσ* are ≈ 0.5, so the constant rate reaches them in ~10 steps and
  then has 30 steps to settle); 2 noisy 4×4 latents per step, a 1-token zero conditioning.
* Measured (development runs of the same loop outside the executor, three planted draws, and this
  file's run): relative error ‖Δσ − Δσ*‖/‖Δσ*‖ = 0.13, 0.16, 0.18 and 0.21 (this file, deterministic)
  after 40 steps; with a cosine-decayed rate 0.29, with the stock x0-space loss instead of the
  ε-space one 0.37. The Gauss–Newton matrix of this problem is ill-conditioned (cond ≈ 23 even after
  the per-parameter scaling Adam does: q/k and v/out of one block trade off), so a few dozen steps do
  not get below ~0.1; the test asks for < 0.45. Loss (mean of the first 10 steps over the last 10):
  12–27 measured, the test asks for > 4. The step-to-step loss varies ×10 with the random noise
  level, hence means over 10 steps. The run takes ~9 s on an idle 2-core machine (~40 s loaded).
* Everything that is exact is tested exactly: base weights and U/V buffers with ``torch.equal``,
  the cross-attention Δσ (no gradient under a zero conditioning) are exactly 0, parameter count
  and file size to the byte, the saved file reproduces the trained model through LoRA-X Load.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

import host
from reference import orthonormal, rel_err
from lorax.engine import SVDEngine
from lorax.fingerprint import weight_sketch
from lorax.lorax_adapter import LoraxAdapter, load_lorax, save_lorax
from lorax.training import FAMILIES, SigmaAdapter, collect_adapter, parameter_count, prepare_layers, select_layers

R = 2
SCALE = 0.05
STEPS = 40
LR = 0.05
LATENT_PX = 32            # EmptyLatentImage 32×32 -> 4×4 latents
BATCH = 2
REL_ERR_MAX = 0.45
LOSS_FACTOR_MIN = 4.0
SEED = 3                  # planted values: fixed, the tolerance above is calibrated on this problem
ATTENTION = "attention (q, k, v, out)"

# --------------------------------------------------------------------------------------
# The weight wrapper (no ComfyUI)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 40), (24, 8, 3, 3)])
def test_sigma_adapter_is_w_plus_u_diag_sigma_vt(rng, shape):
    m, n = shape[0], int(np.prod(shape[1:]))
    r = 5
    U, V = orthonormal(rng, m, r), orthonormal(rng, n, r)
    sigma = rng.standard_normal(r)
    w = torch.from_numpy(rng.standard_normal(shape)).float()
    a = SigmaAdapter(torch.from_numpy(U), torch.from_numpy(V), torch.from_numpy(sigma))
    ref = w.double().numpy().reshape(m, n) + (U * sigma) @ V.T
    out = a(w)
    assert out.shape == w.shape and out.dtype == torch.float32
    assert rel_err(out.reshape(m, n), ref) < 1e-6
    # Same dtype out as in (fp16 weights stay fp16); zero-initialised adapters change nothing.
    assert a(w.half()).dtype == torch.float16
    zero = SigmaAdapter(torch.from_numpy(U), torch.from_numpy(V))
    assert torch.equal(zero(w), w) and torch.equal(zero.sigma.detach(), torch.zeros(r))
    with pytest.raises(ValueError, match="for a"):
        a(torch.zeros(m + 1, n))


def test_only_sigma_is_trainable_and_the_basis_stays_frozen(rng):
    m, n, r = 32, 24, 4
    U, V = torch.from_numpy(orthonormal(rng, m, r)), torch.from_numpy(orthonormal(rng, n, r))
    a = SigmaAdapter(U, V)
    assert [name for name, _ in a.named_parameters()] == ["sigma"]
    assert {name for name, _ in a.named_buffers()} == {"U", "V"}
    assert a.U.dtype == a.V.dtype == torch.float32 and not a.U.requires_grad and not a.V.requires_grad
    U0, V0 = a.U.clone(), a.V.clone()
    w = torch.from_numpy(rng.standard_normal((m, n))).float()  # a frozen base weight
    x = torch.from_numpy(rng.standard_normal((8, n))).float()
    target = x @ (w + 0.3 * (a.U[:, :1] @ a.V[:, :1].T)).T
    opt = torch.optim.Adam(a.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        loss = ((x @ a(w).T - target) ** 2).mean()
        loss.backward()
        opt.step()
    assert torch.equal(a.U, U0) and torch.equal(a.V, V0) and w.grad is None
    s = a.sigma.detach()
    assert abs(float(s[0]) - 0.3) < 0.02 and float(s[1:].abs().max()) < 0.02
    # The host's memory bookkeeping: bytes of U, V and sigma, also after a move.
    assert a.passive_memory_usage() == 4 * (m * r + n * r + r) == a.move_to("cpu")


def test_collected_adapter_round_trips_with_sketches_and_size(tmp_path, rng):
    weights = {f"diffusion_model.b{i}.attn1.to_q.weight": torch.from_numpy(rng.standard_normal((40, 30))).float()
               for i in range(3)}
    weights["diffusion_model.conv.weight"] = torch.from_numpy(rng.standard_normal((8, 2, 3, 3))).float()
    modules = {k: "lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_") for k in weights}
    layers = prepare_layers(weights, modules, 20, SVDEngine())
    assert [l.rank for l in layers] == [20, 20, 20, 8]  # capped at the conv kernel's rank (8)
    with torch.no_grad():
        for layer in layers:
            layer.adapter.sigma.copy_(torch.from_numpy(rng.standard_normal(layer.rank)))
    adapter = collect_adapter(layers, metadata={"lorax_source": "test"})
    assert parameter_count(layers) == adapter.parameter_count == 68
    path = tmp_path / "trained.safetensors"
    save_lorax(path, adapter)
    back = load_lorax(path)
    for layer in layers:
        assert torch.equal(back.sigmas[layer.module], layer.adapter.sigma.detach())
        assert torch.equal(back.sketches[layer.module], weight_sketch(weights[layer.key]))
    # The file: 8-byte length, JSON header, 4 bytes per Δσ, 9 float64 per sketch.
    raw = path.read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    assert len(raw) == 8 + header + 4 * 68 + 72 * 4
    # The delta the adapter applies is the one LoRA-X files describe (U_r diag(Δσ) V_rᵀ of the source).
    f = SVDEngine().factors(weights[layers[0].key], 20)
    d = back.delta(layers[0].module, f, weights[layers[0].key].shape)
    assert rel_err(d.weight(), layers[0].adapter.delta()) < 1e-6


def test_layer_families_on_the_sd15_layout():
    layout = host.unet_layout(model_channels=320, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=[1, 1],
                               context_dim=768, in_channels=4, out_channels=4)
    shapes = {"diffusion_model." + k: s for k, s, _ in layout}
    transformers = sum(1 for k in shapes if k.endswith("proj_in.weight"))
    convs = sum(1 for s in shapes.values() if len(s) == 4)
    attn, ff, everything = (select_layers(shapes, f) for f in FAMILIES)
    assert len(attn) == 8 * transformers and all(".attn1." in k or ".attn2." in k for k in attn)
    assert len(ff) == 10 * transformers and set(attn) < set(ff)
    assert len(everything) == 10 * transformers + convs  # proj_in / proj_out are 1×1 convs in SD1.5
    assert not any("time_embed" in k or "emb_layers" in k or k.endswith(".bias") for k in everything)


# --------------------------------------------------------------------------------------
# The node on the real host
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack(comfy_host):
    nodes = comfy_host.load_pack(host.REPO_ROOT)
    assert "LoraxTrain" in nodes
    return comfy_host.pack_module(host.REPO_ROOT)


@pytest.fixture(scope="module")
def planted(comfy_host):
    """A one-level SD1.5 UNet (26 M parameters), a teacher with Δσ* on every self-attention weight."""
    src = host.build_mini_sd15_unet(seed=0, channel_mult=(1,))
    rng = np.random.default_rng(SEED)
    teacher, delta_sigma = dict(src), {}
    for key in sorted(k for k in src if ".attn1." in k and k.endswith(".weight")):
        W = src[key].double().numpy()
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        d = SCALE * S[:R] * rng.uniform(-1, 1, R)
        delta_sigma[key] = d
        teacher[key] = torch.from_numpy(W + (U[:, :R] * d) @ Vt[:R]).float()
    return {"src": src, "delta_sigma": delta_sigma,
            "src_name": comfy_host.save_unet(src, "train_src.safetensors"),
            "teacher_name": comfy_host.save_unet(teacher, "train_teacher.safetensors")}


def _train_prompt(src_name, *, teacher=None, steps=STEPS, save_name="", extra=None, lr=LR):
    p = {
        "src": {"class_type": "UNETLoader", "inputs": {"unet_name": src_name, "weight_dtype": "default"}},
        "pos": host.zero_cond(tokens=1),
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": LATENT_PX, "height": LATENT_PX,
                                                             "batch_size": BATCH}},
        "train": {"class_type": "LoraxTrain", "inputs": {
            "model": ["src", 0], "latents": ["lat", 0], "positive": ["pos", 0], "batch_size": BATCH,
            "steps": steps, "learning_rate": lr, "rank": R, "layers": ATTENTION, "seed": 7,
            "training_dtype": "fp32", "gradient_checkpointing": False, "save_name": save_name}},
        "model": host.capture(["train", 0]), "adapter": host.capture(["train", 1]),
        "loss": host.capture(["train", 2]), "report": host.capture(["train", 3]), "source": host.capture(["src", 0]),
    }
    if teacher is not None:
        p.update(teacher)
        p["train"]["inputs"]["teacher"] = ["teacher", 0]
    p.update(extra or {})
    return p


def _teacher_loader(name):
    return {"teacher": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}}


def _loras(comfy_host):
    return sorted(str(p.relative_to(comfy_host.folders["loras"])) for p in comfy_host.folders["loras"].rglob("*")
                  if p.is_file())


@pytest.fixture(scope="module")
def trained(comfy_host, pack, planted):
    """One distillation run, with the adapters the node built recorded (a spy on prepare_layers)."""
    train_node = pack.nodes.train_node
    record = {}
    original = train_node.prepare_layers

    def spy(*args, **kwargs):
        layers = original(*args, **kwargs)
        record["layers"] = layers
        record["basis"] = [(l.adapter.U.clone(), l.adapter.V.clone()) for l in layers]
        record["grads"] = {l.key: 0 for l in layers}
        for l in layers:
            l.adapter.sigma.register_hook(lambda g, key=l.key: record["grads"].__setitem__(key, record["grads"][key] + 1))
        return layers

    train_node.prepare_layers = spy
    try:
        import time
        t0 = time.perf_counter()
        out = comfy_host.run_prompt(_train_prompt(planted["src_name"], teacher=_teacher_loader(planted["teacher_name"]),
                                                  save_name="lorax/test_trained"))
        record["seconds"] = time.perf_counter() - t0
    finally:
        train_node.prepare_layers = original
    record.update({k: out[k]["value"][0] for k in ("model", "adapter", "loss", "report", "source")})
    record["ui"] = out["train"]["text"][0]
    return record


def test_training_recovers_the_planted_singular_values(trained, planted):
    losses = np.array(trained["loss"]["loss"])
    assert len(losses) == STEPS and np.isfinite(losses).all()
    factor = losses[:10].mean() / losses[-10:].mean()
    adapter = trained["adapter"].content
    names = {host.kohya_lora_prefix(k): k for k in planted["src"]}
    got, want = [], []
    for module, sigma in adapter.sigmas.items():
        key = names[module]
        if ".attn2." in key:
            # Zero conditioning: cross-attention sees no signal, so its Δσ never received a gradient.
            assert torch.equal(sigma, torch.zeros(R)), key
            continue
        got.append(sigma.double().numpy())
        want.append(planted["delta_sigma"][key])
    err = float(np.linalg.norm(np.concatenate(got) - np.concatenate(want)) / np.linalg.norm(np.concatenate(want)))
    print(f"\nΔσ relative error {err:.3f}, loss factor {factor:.1f}, training run {trained['seconds']:.1f} s")
    print(trained["report"])
    assert len(got) == 16 and factor > LOSS_FACTOR_MIN and err < REL_ERR_MAX, (err, factor)


def test_only_delta_sigma_changed(comfy_host, trained, planted):
    from comfy.weight_adapter import WeightAdapterTrainBase

    layers = trained["layers"]
    assert len(layers) == 32  # 4 transformer blocks × (attn1, attn2) × (q, k, v, out)
    for layer, (U0, V0) in zip(layers, trained["basis"]):
        assert torch.equal(layer.adapter.U, U0) and torch.equal(layer.adapter.V, V0)
        assert [p is layer.adapter.sigma for p in layer.adapter.parameters()] == [True]
        assert isinstance(layer.adapter, WeightAdapterTrainBase)  # the host's trainable-adapter type
    assert all(trained["grads"][l.key] == STEPS for l in layers)  # one gradient per step reached every Δσ
    comfy_host.unload_all()
    source = trained["source"].model
    assert all(p.grad is None for p in source.parameters())
    state = source.state_dict()
    for key, value in planted["src"].items():
        assert torch.equal(state["diffusion_model." + key], value.to(state["diffusion_model." + key].dtype)), key
    # No training wrapper is left on the (shared) modules.
    assert not any(m.__dict__.get("weight_function") for m in source.modules())


def test_report_counts_and_saved_file(comfy_host, trained):
    handle = trained["adapter"]
    assert handle.kind == "lorax" and handle.name.startswith("lorax/test_trained_") and os.path.isfile(handle.path)
    params = 32 * R
    assert handle.content.parameter_count == params
    size = os.path.getsize(handle.path)
    with open(handle.path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    # 8-byte length + JSON header (~140 bytes per tensor: its long module name, dtype, shape, offsets;
    # plus the metadata) + 4 bytes per Δσ + 72 bytes per source sketch.
    assert size == 8 + header + 4 * params + 72 * 32 and header < 160 * 64 + 1500
    report = trained["report"]
    assert report == trained["ui"]
    assert f"trained parameters: {params}" in report and f"({size} bytes)" in report and "32 layers" in report
    back = load_lorax(handle.path)
    assert back.sigmas.keys() == handle.content.sigmas.keys()
    assert all(torch.equal(back.sigmas[m], s) for m, s in handle.content.sigmas.items())
    assert back.metadata["lorax_training"] == "distillation" and back.metadata["lorax_steps"] == str(STEPS)


def test_lorax_load_of_the_file_reproduces_the_trained_model(comfy_host, trained, planted):
    out = comfy_host.run_prompt({
        "src": {"class_type": "UNETLoader", "inputs": {"unet_name": planted["src_name"], "weight_dtype": "default"}},
        "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": trained["adapter"].name,
                                                       "strength": 1.0}},
        "m": host.capture(["load", 0]),
    })
    keys = ["diffusion_model." + names for names in planted["delta_sigma"]]
    loaded = comfy_host.patched_weights(out["m"]["value"][0], keys)
    mine = comfy_host.patched_weights(trained["model"], keys)
    for key in keys:
        assert rel_err(loaded[key], mine[key]) < 1e-5, key
        assert not torch.equal(mine[key], planted["src"][key[len("diffusion_model."):]])  # it is patched


def test_teacher_sharing_the_source_weights_gives_the_same_run(comfy_host, pack, trained, planted):
    """Teacher = LoRA-X Load(source, Δσ*): a clone of the source plus patches, the same weights in
    memory. Its patches are applied on the fly for the teacher pass; the first steps must match the
    run with the teacher loaded from its own file (same seed: same noise, noise levels, batches)."""
    names = {k: host.kohya_lora_prefix(k) for k in planted["delta_sigma"]}
    src = planted["src"]
    plant = LoraxAdapter(sigmas={names[k]: torch.from_numpy(d).float() for k, d in planted["delta_sigma"].items()},
                         sketches={names[k]: weight_sketch(src[k]) for k in names})
    path = comfy_host.folders["loras"] / "planted_for_shared_teacher.safetensors"
    save_lorax(path, plant)
    teacher = {"teacher": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": path.name,
                                                                  "strength": 1.0}}}
    out = comfy_host.run_prompt(_train_prompt(planted["src_name"], teacher=teacher, steps=3))
    losses = out["loss"]["value"][0]["loss"]
    assert rel_err(np.array(losses), np.array(trained["loss"]["loss"][:3])) < 1e-3, (losses, trained["loss"]["loss"][:3])
    source = out["source"]["value"][0].model
    assert not any(m.__dict__.get("weight_function") for m in source.modules())
    # The source itself as its own teacher is refused before any work.
    itself = _train_prompt(planted["src_name"])
    itself["train"]["inputs"]["teacher"] = ["src", 0]
    with pytest.raises(host.ComfyExecutionError, match="teacher is the source model itself"):
        comfy_host.run_prompt(itself)


def test_denoising_without_teacher_and_no_save(comfy_host, pack, planted):
    before = _loras(comfy_host)
    out = comfy_host.run_prompt(_train_prompt(planted["src_name"], steps=3, lr=0.01))
    losses = out["loss"]["value"][0]["loss"]
    assert len(losses) == 3 and np.isfinite(losses).all()
    handle = out["adapter"]["value"][0]
    assert handle.kind == "lorax" and handle.path == "" and handle.content.metadata["lorax_training"] == "denoising"
    assert "not saved" in out["report"]["value"][0] and _loras(comfy_host) == before


@pytest.mark.parametrize("how", ["error", "cancel"])
def test_a_failed_run_leaves_no_file_and_no_wrappers(comfy_host, pack, planted, monkeypatch, how):
    """An exception in step 3, or ComfyUI's cancel button pressed during step 3 (the flag the
    queue's interrupt sets, checked before every step): no file, no temporary file, no wrapper."""
    import comfy.model_management
    executor = comfy_host.new_executor()
    first = comfy_host.run_prompt({
        "src": {"class_type": "UNETLoader", "inputs": {"unet_name": planted["src_name"], "weight_dtype": "default"}},
        "m": host.capture(["src", 0])}, executor=executor)
    source = first["m"]["value"][0]
    before = _loras(comfy_host)
    calls = []
    original_step = torch.optim.Adam.step

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            if how == "error":
                raise RuntimeError("simulated failure in step 3")
            comfy.model_management.interrupt_current_processing(True)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    prompt = _train_prompt(planted["src_name"], teacher=_teacher_loader(planted["teacher_name"]), steps=6,
                           save_name="lorax/must_not_exist")
    with pytest.raises(host.ComfyExecutionError) as failure:
        comfy_host.run_prompt(prompt, executor=executor)
    if how == "error":
        assert "simulated failure in step 3" in str(failure.value)
    else:
        assert failure.value.details.get("exception_message") is None  # an interruption, not an error
    assert len(calls) == 3
    assert _loras(comfy_host) == before  # no adapter, no temporary file
    comfy_host.unload_all()
    assert not any(m.__dict__.get("weight_function") for m in source.model.modules())
    assert not json.dumps(before).count("must_not_exist")
