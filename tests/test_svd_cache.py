"""The SVD cache: hits do no SVD, damaged or stale entries are rebuilt, the folder stays bounded."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lorax.engine import SVDEngine
from lorax.svd_cache import SVDCache
from reference import fresh_seed, power_law_matrix, rel_err, t


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
    for a, b in zip(ref, again):
        assert rel_err(a.top(12).U @ a.top(12).U.T, b.U @ b.U.T) < 1e-6
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
    assert rel_err(f.U @ f.U.T, exact.U @ exact.U.T) < 1e-6
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
                        SafetensorsWeights(tmp_path / "tgt.safetensors"), TransferSettings(rank=8), engine)
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
