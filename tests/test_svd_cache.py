"""The SVD cache: hits do no SVD, damaged or stale entries are rebuilt, the folder stays bounded."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lorax.engine import SVDEngine
from lorax.svd import truncated_svd
from lorax.svd_cache import SVDCache
from reference import HALF_FACTOR_TOL, fresh_seed, power_law_matrix, rel_err, t


@pytest.fixture
def weights():
    rng = np.random.default_rng(fresh_seed())
    return [t(power_law_matrix(rng, 96, 64), torch.float32) for _ in range(3)] + \
           [t(power_law_matrix(rng, 64, 40), torch.float32)]


def test_second_engine_does_no_svd(tmp_path, weights):
    first = SVDEngine(store=SVDCache(tmp_path), workers=1)
    ref = first.factors_many([(w, 16) for w in weights])
    assert first.stats.layers_decomposed == 4 and first.stats.svd_calls == 2  # batched by shape
    second = SVDEngine(store=SVDCache(tmp_path))
    again = second.factors_many([(w, 12) for w in weights])
    assert second.stats.layers_decomposed == 0 and second.stats.svd_calls == 0 and second.stats.disk_hits == 4
    for a, b in zip(ref, again):  # the cold run computed with the rounded numbers the warm run reads
        assert torch.equal(a.top(12).U, b.U) and torch.equal(a.top(12).S, b.S) and torch.equal(a.top(12).V, b.V)
    # A different adapter on the same model asks for the same layers: memory hits now.
    second.factors_many([(w, 8) for w in weights])
    assert second.stats.layers_decomposed == 0 and second.stats.memory_hits == 4
    # A larger k than cached is a miss, computed once and stored.
    third = SVDEngine(store=SVDCache(tmp_path))
    third.factors(weights[0], 20)
    assert third.stats.layers_decomposed == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "stale", "not_orthonormal", "repeated_column",
                                    "nan_in_V", "inf_in_S"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, weights, damage, caplog):
    cache = SVDCache(tmp_path)
    SVDEngine(store=cache).factors(weights[0], 16)
    (path, size, _), = cache.entries()
    data = open(path, "rb").read()
    if damage == "truncate":
        open(path, "wb").write(data[: size // 2])
    elif damage == "garbage":
        open(path, "wb").write(b"\x00" * size)
    elif damage == "stale":  # an entry filed under another weight's digest
        other = SVDCache(tmp_path / "other")
        SVDEngine(store=other).factors(weights[1], 16)
        os.replace(other.entries()[0][0], path)
    else:
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        if damage == "not_orthonormal":
            tensors["U"] = tensors["U"] * 2
        elif damage == "nan_in_V":  # one entry: its column's norm is NaN, which the unit test rejects
            tensors["V"][3, 5] = float("nan")
        elif damage == "inf_in_S":
            tensors["S"][2] = float("inf")
        else:  # unit columns, but two of them equal
            tensors["U"][:, -1] = tensors["U"][:, 0]
        save_file(tensors, path, metadata=meta)
    engine = SVDEngine(store=SVDCache(tmp_path))
    with caplog.at_level("WARNING", logger="lorax"):
        f = engine.factors(weights[0], 16)
    assert engine.stats.layers_decomposed == 1 and engine.store.rejected == 1
    # One warning that names the entry and says why it was not trusted.
    reason = {"nan_in_V": "not finite unit vectors", "inf_in_S": "non-finite singular values",
              "not_orthonormal": "unit vectors", "stale": "does not match"}.get(damage, "")
    warning, = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert os.path.basename(path) in warning and reason in warning and "recomputing" in warning
    exact = SVDEngine(method="exact").factors(weights[0], 16)
    assert rel_err(f.U @ f.U.T, exact.U @ exact.U.T) < HALF_FACTOR_TOL
    # The rebuilt entry is valid again.
    fresh = SVDEngine(store=SVDCache(tmp_path))
    fresh.factors(weights[0], 16)
    assert fresh.stats.layers_decomposed == 0 and fresh.stats.disk_hits == 1


def test_cache_is_size_bounded_lru(tmp_path, weights):
    probe = SVDCache(tmp_path / "probe")
    SVDEngine(store=probe).factors(weights[0], 16)
    one = probe.size_bytes()
    cache = SVDCache(tmp_path / "c", max_bytes=int(2.5 * one))
    engine = SVDEngine(store=cache)
    for w in weights[:3]:
        engine.factors(w, 16)
        os.utime(cache.entries()[-1][0], (1e9 + len(cache.entries()),) * 2)  # distinct mtimes
    assert len(cache.entries()) == 2 and cache.size_bytes() <= 2.5 * one
    fresh = SVDEngine(store=SVDCache(tmp_path / "c", max_bytes=int(2.5 * one)))
    fresh.factors(weights[0], 16)  # the oldest was evicted
    assert fresh.stats.layers_decomposed == 1


def test_warm_run_over_files_neither_hashes_nor_decomposes(tmp_path, weights, monkeypatch):
    """Through SafetensorsWeights, a second engine finds entries by file identity: no hash, no SVD;
    rewriting the file (new mtime/size) makes it hash again and still find the same content."""
    from safetensors.torch import save_file

    from lorax import fingerprint
    from lorax.delta import Delta
    from lorax.safetensors_weights import SafetensorsWeights
    from lorax.transfer import TransferSettings, transfer_deltas

    sd = {f"diffusion_model.l{i}.weight": w for i, w in enumerate(weights)}
    save_file(sd, str(tmp_path / "src.safetensors"))
    save_file({k: v * 1.01 for k, v in sd.items()}, str(tmp_path / "tgt.safetensors"))
    deltas = {k: Delta.factored(v.shape, torch.ones(v.shape[0], 1), torch.ones(1, v.shape[1])) for k, v in sd.items()}

    def run():
        engine = SVDEngine(store=SVDCache(tmp_path / "cache"))
        transfer_deltas(deltas, SafetensorsWeights(tmp_path / "src.safetensors"),
                        SafetensorsWeights(tmp_path / "tgt.safetensors"), TransferSettings(rank=8, mode="prolora"),
                        engine)  # a mode that decomposes (auto would copy these 1 % changes without an SVD)
        return engine

    assert run().stats.layers_decomposed == 8
    hashed = []
    real = fingerprint.hashlib.blake2b
    monkeypatch.setattr(fingerprint.hashlib, "blake2b", lambda **kw: hashed.append(1) or real(**kw))
    warm = run()
    assert warm.stats.layers_decomposed == 0 and hashed == []
    save_file({k: v * 1.01 for k, v in sd.items()}, str(tmp_path / "tgt.safetensors"))  # same bytes, new file
    again = run()
    assert again.stats.layers_decomposed == 0 and len(hashed) == 4  # target re-hashed, found by content


@pytest.mark.parametrize("mode", ["lorax", "prolora"])
def test_a_warm_transfer_reuses_similarities_and_reads_only_the_factors_it_projects_with(tmp_path, weights, mode,
                                                                                          monkeypatch):
    """Φ of a layer pair is remembered by the two weights' digests (scores.log): a second transfer
    between the same files computes none, reads no factors for a pair below the threshold and, with
    the lorax projection, only the target's; its layers are identical to the first run's and to a
    run without any cache. A damaged score line costs one recomputation, never a wrong result."""
    from safetensors.torch import save_file

    from lorax import transfer as transfer_module
    from lorax.delta import Delta
    from lorax.safetensors_weights import SafetensorsWeights
    from lorax.transfer import Decision, TransferSettings, similarity_table, transfer_deltas

    rng = np.random.default_rng(fresh_seed())
    sd = {f"diffusion_model.l{i}.weight": w for i, w in enumerate(weights)}
    # Layers 0-2 fine-tuned (similar), layer 3 replaced by an unrelated matrix (below the threshold).
    tuned = {k: w + 0.02 * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape) for k, w in list(sd.items())[:3]}
    tuned["diffusion_model.l3.weight"] = t(power_law_matrix(rng, 64, 40), torch.float32)
    save_file(sd, str(tmp_path / "src.safetensors"))
    save_file(tuned, str(tmp_path / "tgt.safetensors"))
    deltas = {k: Delta.factored(v.shape, torch.randn(v.shape[0], 2), torch.randn(2, v.shape[1])) for k, v in sd.items()}
    settings = TransferSettings(rank=8, mode=mode)
    computed = []
    real = transfer_module.layer_similarity
    monkeypatch.setattr(transfer_module, "layer_similarity", lambda *a, **kw: computed.append(1) or real(*a, **kw))

    def run(store=True):
        engine = SVDEngine(store=SVDCache(tmp_path / "cache") if store else None)
        computed.clear()
        result = transfer_deltas(deltas, SafetensorsWeights(tmp_path / "src.safetensors"),
                                 SafetensorsWeights(tmp_path / "tgt.safetensors"), settings, engine)
        return result, engine

    def same(a, b):
        assert [l.row() for l in a.layers] == [l.row() for l in b.layers]
        assert a.deltas.keys() == b.deltas.keys()
        for key, d in a.deltas.items():
            assert torch.equal(d.up, b.deltas[key].up) and torch.equal(d.down, b.deltas[key].down)

    cold, engine = run()
    assert engine.stats.layers_decomposed == 8 and len(computed) == 4
    decisions = [l.decision for l in cold.layers]
    assert decisions == [Decision.TRANSFERRED] * 3 + [Decision.LOW_SIMILARITY]
    warm, engine = run()
    assert engine.stats.layers_decomposed == 0 and computed == []
    assert engine.stats.disk_hits == (3 if mode == "lorax" else 6)  # the passing pairs' factors only
    same(warm, cold)
    uncached, _ = run(store=False)
    same(uncached, cold)
    # A damaged line (here: one value instead of four) is ignored: that pair is scored again.
    log = tmp_path / "cache" / "scores.log"
    lines = log.read_text().splitlines()
    key, value = lines[0].split("\t")
    log.write_text("\n".join([f"{key}\t{value.split(',')[0]}"] + lines[1:]) + "\n")
    again, engine = run()
    assert len(computed) == 1 and engine.stats.disk_hits == (3 if mode == "lorax" else 6) + (mode == "lorax")
    same(again, cold)
    # A table of scores needs nothing but the remembered similarities.
    engine = SVDEngine(store=SVDCache(tmp_path / "cache"))
    rows = similarity_table(SafetensorsWeights(tmp_path / "src.safetensors"),
                            SafetensorsWeights(tmp_path / "tgt.safetensors"), list(sd), engine, rank=8)
    assert engine.stats.disk_hits == 0 and len(rows) == 4
    assert {r["key"]: r["phi"] for r in rows} == {l.key: l.similarity.phi for l in cold.layers}


def test_batches_are_bounded_in_bytes(weights):
    engine = SVDEngine(batch_size=8, max_batch_bytes=2 * 8 * weights[0].numel(), workers=1)
    engine.factors_many([(w, 8) for w in weights[:3]])
    assert engine.stats.svd_calls == 2 and engine.stats.peak_batch_bytes == 2 * 8 * weights[0].numel()
    # Side by side on the CPU, the same bound limits how many run at once.
    side = SVDEngine(max_batch_bytes=2 * 8 * weights[0].numel(), workers=3)
    side.factors_many([(w, 8) for w in weights[:3]])
    assert side.stats.peak_workers == 2 and side.stats.peak_batch_bytes == 2 * 8 * weights[0].numel()


def test_cpu_workers_give_the_serial_results_and_restore_threads(weights):
    """Side-by-side single-threaded decompositions: one task per weight, same factors as the
    batched serial path (float32 factors: 1e-6 is a few float32 roundings of a unit projector),
    and the caller's torch thread count comes back."""
    threads = torch.get_num_threads()
    serial = SVDEngine(workers=1).factors_many([(w, 10) for w in weights])
    side = SVDEngine(workers=3)
    parallel = side.factors_many([(w, 10) for w in weights])
    assert side.stats.svd_calls == 4 and side.stats.layers_decomposed == 4 and side.stats.peak_workers == 3
    assert torch.get_num_threads() == threads
    for a, b in zip(serial, parallel):
        assert a.U.dtype == b.U.dtype == torch.float32
        assert rel_err(a.U @ a.U.T, b.U @ b.U.T) < 1e-6 and rel_err(a.S, b.S) < 1e-6
    # A failing task propagates its error, and the thread count is restored all the same.
    with pytest.raises(ValueError):
        SVDEngine(workers=2).factors_many([(weights[0], 10), (torch.ones(5), 1)])
    assert torch.get_num_threads() == threads


def test_memo_is_bounded_in_bytes(weights):
    one = 4 * (96 * 16 + 16 + 64 * 16)  # float32 U, S, V of one 96×64 weight at k = 16
    engine = SVDEngine(memory_bytes=2 * one)
    engine.factors_many([(w, 16) for w in weights[:3]])
    assert engine.memo_bytes == 2 * one
    engine.factors(weights[2], 16)  # the newest stayed
    assert engine.stats.memory_hits == 1 and engine.stats.layers_decomposed == 3
    engine.factors(weights[0], 16)  # the oldest went first
    assert engine.stats.layers_decomposed == 4


def test_a_long_request_does_not_hold_all_its_weights(weights):
    """A layer map asks for a whole role's layers in one call: the misses are decomposed as soon as
    their stored bytes reach ``max_batch_bytes``, so only a few loaded weights are alive at once
    (before: all six), and the factors are those of one unbounded call."""
    import weakref

    six = [w * (1 + i // 3) for i, w in enumerate(weights[:3] * 2)]  # distinct contents, one shape
    alive: list = []
    most = [0]

    def loader(w):
        def load():
            copy = w.clone()
            alive.append(weakref.ref(copy))
            most[0] = max(most[0], sum(r() is not None for r in alive))
            return copy
        return load

    bounded = SVDEngine(max_batch_bytes=2 * six[0].nbytes, workers=1)
    got = bounded.factors_many([(loader(w), 8) for w in six])
    assert most[0] <= 3 and bounded.stats.layers_decomposed == 6
    want = SVDEngine(workers=1).factors_many([(w, 8) for w in six])
    for a, b in zip(got, want):
        assert rel_err(a.S, b.S) < 1e-6  # the same float32 computation, batched differently


# --- Half-precision entries (cache version 2) --------------------------------------------------


def _entry_dtypes(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in ("U", "S", "V")}, f.metadata()


def test_entries_are_half_the_float32_bytes_and_as_accurate_as_stated(tmp_path, weights):
    """U and V are stored in float16 and σ in float32; an entry is half a float32 one (but for σ and
    the header); the factors are within HALF_FACTOR_TOL of the float64 reference (reference.py), and
    cache off, cold and warm give the same numbers."""
    half, full = SVDCache(tmp_path / "half"), SVDCache(tmp_path / "full")
    cold = SVDEngine(store=half).factors(weights[0], 16)
    SVDEngine(store=full, stored_dtype=torch.float32).factors(weights[0], 16)
    (path, size, _), = half.entries()
    dtypes, meta = _entry_dtypes(path)
    assert dtypes == {"U": "F16", "S": "F32", "V": "F16"} and meta["version"] == "2"
    (_, full_size, _), = full.entries()
    data16, data32 = (2 * (96 + 64) + 4) * 16, (4 * (96 + 64) + 4) * 16
    assert size - data16 == pytest.approx(full_size - data32, abs=16)  # the same header, give or take
    assert size < 0.52 * full_size
    off = SVDEngine().factors(weights[0], 16)
    warm = SVDEngine(store=SVDCache(tmp_path / "half")).factors(weights[0], 16)
    for f in (off, warm):
        assert all(torch.equal(a, b) for a, b in zip((cold.U, cold.S, cold.V), (f.U, f.S, f.V)))
    assert cold.U.dtype == torch.float32 and torch.equal(cold.U, cold.U.half().float())
    exact = SVDEngine(method="exact").factors(weights[0], 16)
    for a, b in ((cold.U, exact.U), (cold.V, exact.V)):
        err = rel_err(a @ a.T, b @ b.T)
        assert err < HALF_FACTOR_TOL
    assert rel_err(cold.S, exact.S) < 1e-6  # σ stays float32


def test_exact_route_keeps_float64(tmp_path, weights):
    cache = SVDCache(tmp_path)
    f = SVDEngine(method="exact", store=cache).factors(weights[1], 10)
    dtypes, _ = _entry_dtypes(cache.entries()[0][0])
    assert dtypes == {"U": "F64", "S": "F64", "V": "F64"} and f.U.dtype == torch.float64
    U, S, Vh = np.linalg.svd(weights[1].double().numpy())
    assert rel_err(f.U @ f.U.T, U[:, :10] @ U[:, :10].T) < 1e-10 and rel_err(f.S, S[:10]) < 1e-12
    warm = SVDEngine(method="exact", store=SVDCache(tmp_path))
    assert torch.equal(warm.factors(weights[1], 10).V, f.V) and warm.stats.disk_hits == 1


def test_version_1_and_other_precision_entries_are_recomputed_quietly(tmp_path, weights, caplog):
    """A float32 entry of cache version 1 is no damage: no warning, not counted as rejected, replaced.
    An entry of another precision than the engine's is a miss too (its numbers are not the ones a
    cold run of this engine would compute) and is overwritten."""
    from safetensors.torch import load_file, save_file

    cache = SVDCache(tmp_path)
    SVDEngine(store=cache).factors(weights[0], 16)
    (path, _, _), = cache.entries()
    _, meta = _entry_dtypes(path)
    old = {k: v.float() for k, v in load_file(path).items()}
    save_file(old, path, metadata={**meta, "version": "1"})
    engine = SVDEngine(store=SVDCache(tmp_path))
    with caplog.at_level("INFO", logger="lorax"):
        engine.factors(weights[0], 16)
    assert engine.stats.layers_decomposed == 1 and engine.store.rejected == 0 and not caplog.records
    assert _entry_dtypes(path)[0]["U"] == "F16"
    single = SVDEngine(store=SVDCache(tmp_path), stored_dtype=torch.float32)
    single.factors(weights[0], 16)
    assert single.stats.layers_decomposed == 1 and _entry_dtypes(path)[0]["U"] == "F32"


# --- Listing and clearing by model -------------------------------------------------------------


def _two_models(tmp_path, weights):
    """Source and target files sharing their last layer unchanged (a fine-tune that left it alone)."""
    from safetensors.torch import save_file

    from lorax.safetensors_weights import SafetensorsWeights

    sd = {f"diffusion_model.l{i}.weight": w for i, w in enumerate(weights)}
    tuned = {k: (v * 1.01 if i < 3 else v) for i, (k, v) in enumerate(sd.items())}
    save_file(sd, str(tmp_path / "src.safetensors"))
    save_file(tuned, str(tmp_path / "tgt.safetensors"))
    return SafetensorsWeights(tmp_path / "src.safetensors"), SafetensorsWeights(tmp_path / "tgt.safetensors"), sd


def _transfer(tmp_path, sd, source, target, cache):
    from lorax.delta import Delta
    from lorax.transfer import TransferSettings, transfer_deltas

    deltas = {k: Delta.factored(v.shape, torch.ones(v.shape[0], 1), torch.ones(1, v.shape[1])) for k, v in sd.items()}
    engine = SVDEngine(store=cache)  # a mode that decomposes every layer (auto copies the near ones)
    transfer_deltas(deltas, source, target, TransferSettings(rank=8, mode="prolora"), engine)
    return engine


def test_entries_are_listed_and_cleared_by_model(tmp_path, weights):
    source, target, sd = _two_models(tmp_path, weights)
    cache = SVDCache(tmp_path / "cache")
    _transfer(tmp_path, sd, source, target, cache)
    src, tgt = str(tmp_path / "src.safetensors"), str(tmp_path / "tgt.safetensors")
    models = {u.model: u for u in cache.models()}
    assert set(models) == {src, tgt} and len(cache.entries()) == 7  # the shared layer is one entry
    assert models[src].entries == models[tgt].entries == 4 and models[src].shared == models[tgt].shared == 1
    assert models[src].bytes == sum(s for p, s, _ in cache.entries() if p in models[src].paths)
    assert models[src].last_used == max(m for p, _, m in cache.entries() if p in models[src].paths)
    removed, freed, kept = SVDCache(tmp_path / "cache").clear(src)
    assert (removed, kept) == (3, 1) and freed > 0
    after = {u.model: u for u in SVDCache(tmp_path / "cache").models()}
    assert set(after) == {tgt} and after[tgt].entries == 4 and after[tgt].shared == 0
    # What stays is still used: the target's factors are read, only the source's are recomputed.
    again = _transfer(tmp_path, sd, source, target, SVDCache(tmp_path / "cache"))
    assert again.stats.layers_decomposed == 3 and again.stats.disk_hits == 4  # + the shared layer from memory
    assert {u.model: u.shared for u in SVDCache(tmp_path / "cache").models()} == {src: 1, tgt: 1}
    (tmp_path / "cache" / ".lorax-x1y2.safetensors.part").write_bytes(b"\0" * 64)  # a write a crash cut short
    assert SVDCache(tmp_path / "cache").clear()[0] == 7
    assert os.listdir(tmp_path / "cache") == []  # the indexes and the leftover went too


def test_entries_of_in_memory_weights_are_listed_as_unknown(tmp_path, weights):
    from lorax.svd_cache import UNKNOWN_MODEL

    cache = SVDCache(tmp_path)
    SVDEngine(store=cache).factors_many([(w, 8) for w in weights])
    SVDEngine(store=cache).factors_many([(weights[0], 8)], origins=["SDXL 1a2b3c4d (loaded in ComfyUI)"])
    models = {u.model: u.entries for u in cache.models()}
    assert models == {UNKNOWN_MODEL: 3, "SDXL 1a2b3c4d (loaded in ComfyUI)": 1}


def _cli(capsys, *argv):
    from lorax_cli.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cache_command_lists_clears_and_survives_a_damaged_entry(tmp_path, weights, capsys, monkeypatch):
    monkeypatch.delenv("LORAX_SVD_CACHE", raising=False)
    source, target, sd = _two_models(tmp_path, weights)
    folder = tmp_path / "cache"
    _transfer(tmp_path, sd, source, target, SVDCache(folder))
    src = str(tmp_path / "src.safetensors")
    # A damaged entry (truncated) is listed by its size and removed by clear, never read.
    damaged = sorted(p for p, _, _ in SVDCache(folder).entries())[0]
    with open(damaged, "r+b") as f:
        f.truncate(100)
    code, out, _ = _cli(capsys, "cache", "--folder", str(folder))
    total = SVDCache(folder).size_bytes()
    assert code == 0 and str(folder) in out and "7 entries" in out and "limit 16.00 GiB" in out
    lines = {line.split()[-1] if "shared" not in line else line.split("  ")[-1].split(" (")[0]: line
             for line in out.splitlines()[2:]}
    assert src in lines and str(tmp_path / "tgt.safetensors") in lines
    assert "1 shared with other models" in lines[src] and " 4 " in lines[src]
    from lorax.svd_cache import describe_bytes
    assert describe_bytes(total) in out.splitlines()[0]
    code, out, _ = _cli(capsys, "cache", "clear", "--model", src, "--folder", str(folder))
    assert code == 0 and "kept 1 entries another model shares" in out
    assert {u.model for u in SVDCache(folder).models()} == {str(tmp_path / "tgt.safetensors")}
    code, out, err = _cli(capsys, "cache", "clear", "--model", str(tmp_path / "nope.safetensors"),
                          "--folder", str(folder))
    assert code == 2 and "nope.safetensors" in err and "tgt.safetensors" in err
    code, out, _ = _cli(capsys, "cache", "clear", "--folder", str(folder))
    assert code == 0 and "removed 4 entries" in out and SVDCache(folder).entries() == []
    code, out, _ = _cli(capsys, "cache", "--folder", str(folder))
    assert code == 0 and "empty" in out


def test_cache_command_on_a_folder_it_cannot_change(tmp_path, weights, capsys, monkeypatch):
    """Removing fails (a read-only folder; simulated, since the tests may run as root, whom
    permissions do not stop): the command says which folder and what to do, exit status 2, and
    lists what is still there."""
    folder = tmp_path / "cache"
    SVDEngine(store=SVDCache(folder)).factors(weights[0], 8)
    real = os.unlink

    def refuse(path, *a, **kw):
        if str(path).startswith(str(folder)):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", refuse)
    code, _, err = _cli(capsys, "cache", "clear", "--folder", str(folder))
    assert code == 2 and str(folder) in err and "Permission denied" in err and "permissions" in err
    assert len(SVDCache(folder).entries()) == 1


def test_an_unwritable_cache_folder_does_not_break_a_transfer(tmp_path, weights, caplog):
    """A cache folder that cannot be created (its parent is a file: fails for root as well): the
    factors are computed and used, one warning names the folder and the way out, and the report
    line says the cache could not be written."""
    (tmp_path / "file").write_text("not a folder")
    cache = SVDCache(tmp_path / "file" / "cache")
    engine = SVDEngine(store=cache)
    with caplog.at_level("WARNING", logger="lorax"):
        got = engine.factors_many([(w, 8) for w in weights])
    assert len(got) == 4 and engine.stats.layers_decomposed == 4
    warnings = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert len(warnings) == 1 and str(cache.folder) in warnings[0] and "LORAX_SVD_CACHE" in warnings[0]
    note = engine.cache_note()
    assert "could not write" in note and "LORAX_SVD_CACHE" in note and "decomposed 4 layers" in note


def test_cache_settings_from_the_environment(tmp_path, monkeypatch, capsys):
    from lorax.errors import LoraxError
    from lorax.svd_cache import cache_from_env

    monkeypatch.setenv("LORAX_SVD_CACHE", "off")
    assert cache_from_env(tmp_path) is None
    assert "off" in SVDEngine().cache_note()
    assert cache_from_env(tmp_path, ignore_off=True).folder == str(tmp_path)
    code, out, _ = _cli(capsys, "cache", "--folder", str(tmp_path / "x"))
    assert code == 0 and "empty" in out
    monkeypatch.setenv("LORAX_SVD_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("LORAX_SVD_CACHE_GB", "2.5")
    cache = cache_from_env(tmp_path)
    assert cache.folder == str(tmp_path / "mine") and cache.max_bytes == int(2.5 * (1 << 30))
    monkeypatch.setenv("LORAX_SVD_CACHE_GB", "lots")
    with pytest.raises(LoraxError, match="LORAX_SVD_CACHE_GB.*'lots'"):
        cache_from_env(tmp_path)


def test_subspace_route_entries_are_cached_and_read_back(tmp_path, weights):
    """Factors of the wide route (a low threshold stands for wide layers) are stored under the route's
    name and read back bit for bit by a second engine, which decomposes nothing."""
    cold = SVDEngine(store=SVDCache(tmp_path), wide_from=64, workers=1)
    ref = cold.factors_many([(w, 16) for w in weights])
    assert cold.stats.routes == {"subspace-a12": 3, "gram": 1}  # 96 × 64 is wide here, 64 × 40 is not
    names = sorted(os.path.basename(p).split("-", 1)[1] for p, _, _ in SVDCache(tmp_path).entries())
    assert names == ["gram.svd.safetensors"] + ["subspace-a12.svd.safetensors"] * 3
    warm = SVDEngine(store=SVDCache(tmp_path), wide_from=64)
    again = warm.factors_many([(w, 16) for w in weights])
    assert warm.stats.layers_decomposed == 0 and warm.stats.disk_hits == 4
    for a, b in zip(ref, again):
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V)


@pytest.mark.parametrize("change", ["gram_then_wide", "wide_then_gram", "other_iterations"])
def test_changing_route_never_reads_another_routes_factors(tmp_path, weights, change, monkeypatch):
    """An entry made by one route is not returned when the layer's route is now another (the threshold
    moved, or the route's iteration count changed): the layer is decomposed again by its route — from
    the disk cache and from an engine's memory alike — and the result is that route's, not the old one."""
    import lorax.svd as svd

    w = weights[0]
    first, second = ({"wide_from": None}, {"wide_from": 64}) if change == "gram_then_wide" else \
                    ({"wide_from": 64}, {"wide_from": None}) if change == "wide_then_gram" else \
                    ({"wide_from": 64}, {"wide_from": 64})
    SVDEngine(store=SVDCache(tmp_path), **first).factors(w, 16)
    if change == "other_iterations":
        monkeypatch.setattr(svd, "SUBSPACE_MAX_PRODUCTS", 7)
        monkeypatch.setattr(svd.route_key, "__defaults__", (7,))
    engine = SVDEngine(store=SVDCache(tmp_path), **second)
    f = engine.factors(w, 16)
    assert engine.stats.layers_decomposed == 1 and engine.stats.disk_hits == 0
    expected_route = "gram" if change == "wide_then_gram" else "subspace"
    direct = engine.rounded(truncated_svd(w, 16, method=expected_route))
    assert torch.equal(f.U, direct.U.float()) and torch.equal(f.V, direct.V.float())
    # One engine whose routing changes between calls: its memory holds the first route's factors.
    engine = SVDEngine(**first)
    engine.factors(w, 16)
    engine.wide_from = second["wide_from"]
    engine.factors(w, 16)
    assert engine.stats.layers_decomposed == (1 if change == "other_iterations" else 2)
