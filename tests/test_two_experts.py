"""One LoRA onto both Wan 2.2 A14B experts, the source decomposed once.

Wan 2.2 A14B samples with two Wan 2.1 14B-shaped diffusion models (high-noise and low-noise
experts); a LoRA trained on Wan 2.1 goes on both. The mini models of ``tests/wan_models.py`` are
built from ComfyUI's own Wan classes and loaded with its ``UNETLoader`` (detected as
``WAN21_T2V``, as the real experts are); the graphs run through ComfyUI's executor.

What two LoRA-X Transfer nodes do today is measured here with the engine's counters
(``EngineStats.layers_decomposed``), on a fresh engine made the way ComfyUI's process makes it:

* with factors that fit in the engine's memo (these mini models): the second node decomposes
  only its own target; the source's factors come from the memo;
* with factors larger than the memo — a Wan 14B LoRA on every linear layer has about 6 GB of source
  factors against a 256 MiB memo, simulated by a memo of one entry — and the SVD cache on: no
  second decomposition either, the source's factors are read back from the disk cache;
* the same with the cache off (``LORAX_SVD_CACHE=off``): **the second node decomposes the source
  again**.

LoRA-X Transfer (two experts) decomposes the source once in every case, and gives each expert
the very deltas a LoRA-X Transfer node of its own gives it.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import host
import wan_models

LAYERS = 2 * len(wan_models.BLOCK_LINEARS)  # the LoRA adapts every linear layer of both blocks


@pytest.fixture(scope="module")
def pack(comfy_host):
    comfy_host.load_pack(host.REPO_ROOT)
    return comfy_host.pack_module(host.REPO_ROOT)


@pytest.fixture(scope="module")
def runtime(pack):
    return importlib.import_module(pack.nodes.__name__ + ".runtime")


@pytest.fixture(scope="module")
def wan_files(comfy_host):
    """(source, high-noise, low-noise) UNET names and the LoRA's name."""
    source = wan_models.build_mini_wan(seed=0)
    high, low = wan_models.build_mini_wan_experts(source)
    names = tuple(comfy_host.save_unet(sd, f"lorax_test_{n}.safetensors")
                  for sd, n in ((source, "wan21_t2v"), (high, "wan22_high_noise"), (low, "wan22_low_noise")))
    lora = wan_models.wan_lora(wan_models.wan_layout(), np.random.default_rng(24), rank=4)
    return names, comfy_host.save_lora(lora, "lorax_test_wan21_lora.safetensors")


@pytest.fixture
def fresh_engine(runtime, monkeypatch, tmp_path):
    """A fresh process-wide engine as ComfyUI makes it (cache in ``tmp_path``, or off), so the
    counters count this test's work only; ``memo_entries=1`` stands for factors larger than the memo."""

    def make(cache: bool, memo_entries: int | None = None):
        monkeypatch.setattr(runtime, "_ENGINES", {})
        monkeypatch.setenv("LORAX_SVD_CACHE", str(tmp_path / "svd") if cache else "off")
        engine = runtime.get_engine(False)
        assert (engine.store is not None) == cache
        if memo_entries is not None:
            engine.memory_bytes = 0  # the memo keeps only its newest entry
        return engine

    return make


def _loaders(names) -> dict:
    return {n: {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
            for n, name in zip(("src", "high", "low"), names)}


SETTINGS = {"rank": 320, "threshold": 0.3, "mode": "prolora", "exact": False}


def _two_transfer_nodes(names, lora) -> dict:
    prompt = _loaders(names)
    prompt["load"] = {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": lora, "strength": 1.0}}
    for n in ("high", "low"):
        prompt[f"t_{n}"] = {"class_type": "LoraxTransfer", "inputs": {
            "source_model": ["src", 0], "target_model": [n, 0], "adapter": ["load", 1], "strength": 1.0, **SETTINGS}}
        prompt[f"cap_{n}"] = host.capture([f"t_{n}", 2])
    return prompt


def _experts_node(names, lora, high_strength=1.0, low_strength=1.0) -> dict:
    prompt = _loaders(names)
    prompt["load"] = {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": lora, "strength": 1.0}}
    prompt["ex"] = {"class_type": "LoraxTransferTwoExperts", "inputs": {
        "source_model": ["src", 0], "high_noise_model": ["high", 0], "low_noise_model": ["low", 0],
        "adapter": ["load", 1], "high_noise_strength": high_strength, "low_noise_strength": low_strength, **SETTINGS}}
    for slot, name in enumerate(("model_high", "model_low", "transfer_high", "transfer_low", "report_high",
                                 "report_low", "plot")):
        prompt[f"cap_{name}"] = host.capture(["ex", slot])
    for n in ("src", "high", "low"):
        prompt[f"cap_in_{n}"] = host.capture([n, 0])
    return prompt


def _value(out, nid):
    return out[nid]["value"][0]


@pytest.mark.parametrize("cache, memo_entries, source_decompositions", [
    (True, None, 1),   # factors fit in the memo: the second node finds the source there
    (True, 1, 1),      # larger than the memo, cache on: read back from the disk cache
    (False, 1, 2),     # larger than the memo, cache off: the second node decomposes the source again
], ids=["memo", "disk-cache", "cache-off"])
def test_what_two_transfer_nodes_decompose_today(comfy_host, pack, fresh_engine, wan_files, cache, memo_entries,
                                                 source_decompositions):
    names, lora = wan_files
    engine = fresh_engine(cache, memo_entries)
    out = comfy_host.run_prompt(_two_transfer_nodes(names, lora))
    for n in ("high", "low"):
        assert _value(out, f"cap_{n}").result.counts() == {"transferred": LAYERS}
    assert engine.stats.layers_decomposed == (source_decompositions + 2) * LAYERS
    if cache and memo_entries:
        assert engine.stats.disk_hits >= LAYERS


@pytest.mark.parametrize("cache", [True, False], ids=["cache-on", "cache-off"])
def test_two_experts_node_decomposes_the_source_once(comfy_host, pack, fresh_engine, wan_files, cache):
    names, lora = wan_files
    engine = fresh_engine(cache, memo_entries=1)  # the case in which two Transfer nodes need the cache
    out = comfy_host.run_prompt(_experts_node(names, lora))
    # Source once, each expert once, nothing read back from a disk cache.
    assert engine.stats.layers_decomposed == 3 * LAYERS
    assert engine.stats.disk_hits == 0
    assert engine.held_bytes == 0, "the source's factors are let go when the node is done"
    for e in ("high", "low"):
        assert _value(out, f"cap_transfer_{e}").result.counts() == {"transferred": LAYERS}


def test_two_experts_node_gives_each_expert_what_a_transfer_node_gives_it(comfy_host, pack, fresh_engine, wan_files):
    names, lora = wan_files
    fresh_engine(cache=False)
    alone = comfy_host.run_prompt(_two_transfer_nodes(names, lora))
    fresh_engine(cache=False, memo_entries=1)
    out = comfy_host.run_prompt(_experts_node(names, lora, high_strength=0.75, low_strength=1.25))
    reports = {}
    for e, strength in (("high", 0.75), ("low", 1.25)):
        handle, single = _value(out, f"cap_transfer_{e}"), _value(alone, f"cap_{e}")
        deltas, expected = handle.result.deltas, single.result.deltas
        assert sorted(deltas) == sorted(expected) and len(deltas) == LAYERS
        for key in expected:  # the same factors, so the same numbers, bit for bit
            assert torch.equal(deltas[key].matrix(), expected[key].matrix()), key
        assert handle.strength == strength
        model, source = _value(out, f"cap_model_{e}"), _value(out, f"cap_in_{e}")
        # A patched clone: the input MODEL is left as it was.
        assert model is not source and model.model is source.model
        assert not source.patches and len(model.patches) == LAYERS
        assert {p[0][0] for p in model.patches.values()} == {strength}
        assert set(model.patches) == set(deltas)
        reports[e] = _value(out, f"cap_report_{e}")
        assert reports[e].startswith(f"{e.capitalize()}-noise expert\n"), reports[e][:80]
        assert f"{LAYERS} of {LAYERS} layers transferred" in reports[e] and "WAN21_T2V" in reports[e]
    assert reports["high"] != reports["low"]  # each expert's own Φ
    assert not _value(out, "cap_in_src").patches
    plot = _value(out, "cap_plot")  # the two experts' charts, one above the other
    half = plot.shape[1] // 2
    assert plot.shape[0] == 1 and plot.shape[1] == 2 * half and plot.shape[2] > half
    green = torch.tensor(pack.nodes.plot.COLORS["transferred"]) / 255.0
    for chart in (plot[0, :half], plot[0, half:]):
        assert ((chart - green).abs().amax(dim=-1) < 0.01).sum() > 100, "no 'transferred' bars in a chart"
    assert not torch.equal(plot[0, :half], plot[0, half:])  # each expert's own title and Φ


def test_a_lorax_adapter_is_read_against_the_source_once(comfy_host, pack, fresh_engine, wan_files):
    """A LoRA-X adapter's deltas are the source's own singular vectors (rank r) times its Δσ: the
    second expert reads them from the held factors too."""
    from lorax.fingerprint import weight_sketch
    from lorax.lorax_adapter import LoraxAdapter, save_lorax

    names, _ = wan_files
    source = wan_models.build_mini_wan(seed=0)
    rng = np.random.default_rng(5)
    sigmas, sketches = {}, {}
    for b in (0, 1):
        for m in wan_models.BLOCK_LINEARS:
            module = host.kohya_lora_prefix(f"blocks.{b}.{m}.weight")
            sigmas[module] = torch.from_numpy(rng.standard_normal(8) * 0.05).float()
            sketches[module] = weight_sketch(source[f"blocks.{b}.{m}.weight"])
    path = comfy_host.folders["loras"] / "lorax_test_wan21_lorax.safetensors"
    save_lorax(path, LoraxAdapter(sigmas=sigmas, sketches=sketches))
    engine = fresh_engine(cache=False, memo_entries=1)
    prompt = _experts_node(names, path.name)
    executor = comfy_host.new_executor()  # keeps the loaders' and LoRA-X Load's outputs for the second run
    # LoRA-X Load applies the adapter to the source first: its own decompositions, counted apart.
    comfy_host.run_prompt({**_loaders(names), "load": prompt["load"], "cap": host.capture(["load", 1])},
                          executor=executor)
    before = engine.stats.layers_decomposed
    assert before == LAYERS
    out = comfy_host.run_prompt(prompt, executor=executor)
    # The source at r = 8 once (all but its last layer, still the memo's one entry from LoRA-X Load), each
    # expert once; without the hold the low-noise expert would read the adapter against the source again.
    assert engine.stats.layers_decomposed - before == (LAYERS - 1) + 2 * LAYERS
    for e in ("high", "low"):
        handle = _value(out, f"cap_transfer_{e}")
        assert handle.adapter.kind == "lorax" and handle.result.counts() == {"transferred": LAYERS}
        assert {layer.rank for layer in handle.result.layers} == {8}


def test_two_experts_node_refuses_the_source_as_a_target(comfy_host, pack, wan_files):
    names, lora = wan_files
    prompt = _experts_node(names, lora)
    prompt["ex"]["inputs"]["low_noise_model"] = ["src", 0]
    with pytest.raises(host.ComfyExecutionError, match="source and target are the same model"):
        comfy_host.run_prompt(prompt)


# ----------------------------------------------------------------------------------------------
# The engine's hold, on its own (no ComfyUI)
# ----------------------------------------------------------------------------------------------


def test_engine_holding_keeps_an_origins_factors_past_the_memo_bound():
    from lorax.engine import SVDEngine

    models = {origin: [host.power_law_matrix(96, 64, seed=seed, key=str(i)) for i in range(4)]
              for origin, seed in (("source", 3), ("target", 4))}

    def ask(engine, origin):
        return engine.factors_many([(w, 16) for w in models[origin]], origins=[origin] * 4)

    plain = SVDEngine(memory_bytes=0, workers=1)  # the memo keeps its newest entry only
    first = ask(plain, "source")
    again = ask(plain, "source")
    assert plain.stats.layers_decomposed == 4 + 3  # all but the newest decomposed again

    held = SVDEngine(memory_bytes=0, workers=1)
    with held.holding("source"):
        with held.holding("source"):  # nested holds of one origin
            a = ask(held, "source")
        b = ask(held, "source")
        assert held.stats.layers_decomposed == 4  # held: nothing decomposed again
        assert held.held_bytes > 0
        ask(held, "target")
        ask(held, "target")  # another origin is not held
        assert held.stats.layers_decomposed == 4 + 4 + 3
    assert held.held_bytes == 0  # let go with the last hold
    ask(held, "source")
    assert held.stats.layers_decomposed == 4 + 4 + 3 + 4
    for fs in (again, a, b):  # the same numbers whether held, in the memo or decomposed again
        for f, g in zip(fs, first):
            assert f.U.dtype == g.U.dtype == torch.float32
            assert torch.equal(f.U, g.U) and torch.equal(f.S, g.S) and torch.equal(f.V, g.V)
