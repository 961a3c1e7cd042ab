#!/usr/bin/env python3
"""Micro-benchmarks behind the "where does a cold LoRA-X transfer spend its time" analysis (not a test).

For one synthetic layer per shape class (the construction of ``bench/transfer.py``: power-law
source stored in float16 and its 5 % fine-tune as the target), times alternatives for the target's
top-k decomposition and measures the relative error of the projected delta
(``project_lorax`` of a random rank-32 LoRA) against the exact float64 SVD of the stored weight:

* ``gram64``       — what the engine does today (``truncated_svd_batch(method="gram")``: float64
                     Gram, float64 ``eigh``, ``V = AᵀU/σ``).
* ``gram64 ×8``    — the same in one batch of 8 weights (the engine's batch), per weight.
* ``g32→eigh64``   — Gram product in float32, upcast, float64 eigh, V in float32.
* ``g32 eigh32``   — everything in float32.
* ``g64 evr k``    — float64 Gram, ``scipy.linalg.eigh(..., subset_by_index=top k, driver="evr")``:
                     only the k wanted eigenpairs (tridiagonalisation is still full).
* ``g32 evr k``    — the same on a float32 Gram (upcast to float64 for scipy).
* ``warm-start q`` — the target's top-k from the *source's* (already computed) top-k basis: q
                     block power steps on the target's Gram with the source basis plus k random
                     columns as start, then Rayleigh–Ritz (eigh of a 2k × 2k matrix). Fine-tunes
                     barely move the principal subspaces, so few steps may do.
* ``randomized``   — the engine's randomized method (float32, oversampling k, 6 power iterations).
* ``svd32``        — full float32 ``torch.linalg.svd`` of the weight as it is (the naive baseline's
                     per-weight cost); ``svd32 tall`` — the same on the tall orientation (LAPACK's
                     gesdd is far slower on wide matrices here).

and, for the steps a run reads and hashes with: ``weight_digest`` (blake2b) against plain blake2b,
sha1 and sha256 of the same bytes; ``SafetensorsWeights.weight`` (opens the file
per call) against one open ``safe_open`` handle; ``SVDCache.get`` (validated) against a plain read.

Extrapolated model totals multiply by the number of layers of the class in both models (source and
target). Usage::

    .venv/bin/python bench/svd_micro.py [--model sdxl|sd15] [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import transfer_models as tm  # noqa: E402  (bench/transfer.py's parts; bench/ is sys.path[0])
import transfer_routes as tr  # noqa: E402
from measure import best, best_and_result  # noqa: E402

from lorax.engine import SVDEngine  # noqa: E402
from lorax.fingerprint import weight_digest  # noqa: E402
from lorax.projection import project_lorax  # noqa: E402
from lorax.safetensors_io import open_safetensors  # noqa: E402
from lorax.safetensors_weights import SafetensorsWeights  # noqa: E402
from lorax.svd import SVDFactors, canonical_signs, truncated_svd_batch, weight_matrix  # noqa: E402
from lorax.svd_cache import SVDCache  # noqa: E402
from lorax.transfer import TransferSettings  # noqa: E402


def _oriented(M):
    """``(A, transposed)`` with A the wide orientation (rows ≤ columns), as svd._gram does."""
    return (M.mT, True) if M.shape[0] > M.shape[1] else (M, False)


def _finish(U, S, A, transposed, dtype=None):
    V = (A.mT @ U.to(A.dtype)) / S.to(A.dtype)
    U, V = U.to(dtype or U.dtype), V.to(dtype or U.dtype)
    return SVDFactors(V, S, U) if transposed else SVDFactors(U, S, V)


def gram_variant(w, k, gram_dtype, eigh_dtype):
    M = weight_matrix(w, gram_dtype)
    A, tr = _oriented(M)
    G = (A @ A.mT).to(eigh_dtype)
    ev, vec = torch.linalg.eigh(G)
    U = vec[:, -k:].flip(-1)
    S = ev[-k:].flip(-1).clamp_min(0).sqrt()
    return _finish(U, S, A, tr)


def gram_evr(w, k, gram_dtype):
    import scipy.linalg
    M = weight_matrix(w, gram_dtype)
    A, tr = _oriented(M)
    G = (A @ A.mT).double().numpy()
    s = G.shape[0]
    ev, vec = scipy.linalg.eigh(G, subset_by_index=[s - k, s - 1], driver="evr", overwrite_a=True,
                                check_finite=False)
    U = torch.from_numpy(vec[:, ::-1].copy())
    S = torch.from_numpy(ev[::-1].copy()).clamp_min(0).sqrt()
    return _finish(U, S, A, tr)


def warm_start(w, k, source: SVDFactors, steps, seed=0):
    """Subspace iteration on the target's Gram from the source's top-k basis, then Rayleigh–Ritz."""
    M = weight_matrix(w, torch.float64)
    A, tr = _oriented(M)
    start = (source.V if tr else source.U).to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    s = A.shape[0]
    extra = min(k, s - k)
    Q = torch.cat([start, torch.randn(s, extra, generator=g, dtype=torch.float64)], dim=1)
    G = A @ A.mT
    Q = torch.linalg.qr(Q).Q
    for _ in range(steps):
        Q = torch.linalg.qr(G @ Q).Q
    T = Q.mT @ G @ Q
    ev, W = torch.linalg.eigh(T)
    U = Q @ W[:, -k:].flip(-1)
    S = ev[-k:].flip(-1).clamp_min(0).sqrt()
    return _finish(U, S, A, tr)


def svd32(w, k, tall=False):
    M = weight_matrix(w, torch.float32)
    if tall and M.shape[0] < M.shape[1]:
        U, S, Vh = torch.linalg.svd(M.mT, full_matrices=False)
        return SVDFactors(Vh[:k].mT, S[:k], U[:, :k])
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return SVDFactors(U[:, :k], S[:k], Vh[:k].mT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sdxl", choices=sorted(tm.UNET_CONFIGS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shapes", default="", help="only these classes, e.g. 1280x1280,1280x5120")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = tm.unet_layers(args.model)
    by_shape: dict[tuple, list[str]] = {}
    for key, shape in layers:
        by_shape.setdefault(tuple(shape), []).append(key)
    want = {s.strip() for s in args.shapes.split(",") if s.strip()}
    settings = TransferSettings()
    synth = tm.Synth(args.seed)
    methods = ["gram64", "gram64 ×8", "g32→eigh64", "g32 eigh32", "g64 evr k", "g32 evr k", "warm-start 1",
               "warm-start 2", "randomized", "svd32", "svd32 tall"]
    totals = dict.fromkeys(methods, 0.0)
    io_steps = ["digest", "blake2b nocopy", "sha1 nocopy", "sha256 nocopy", "read (per call open)",
                "read (open handle)", "cache get", "cache raw read"]
    io_totals = dict.fromkeys(io_steps, 0.0)
    tmp = Path(tempfile.mkdtemp(prefix="lorax-svd-micro-"))
    print(f"{args.model}: one layer per shape class, best of {args.repeat}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("seconds per weight [relative error of the projected delta vs exact float64]")
    try:
        for shape, keys in by_shape.items():
            m, n = tm.matrix_shape(shape)
            name = f"{m}x{n}"
            if want and name not in want:
                continue
            key = keys[0]
            k = settings.rank_for(shape)
            Ws, Wt, _ = synth.layer(args.model, key, shape)
            ws = Ws.to(torch.float16).reshape(shape)
            wt = Wt.to(torch.float16).reshape(shape)
            del Ws, Wt
            g = torch.Generator().manual_seed(tm.seed_of(args.seed, "lora", args.model, key))
            delta = tm.make_adapter(args.model, [(key, shape)], args.seed)[key]
            ref = project_lorax(delta, tr.svd64_top(wt, k))
            fs = truncated_svd_batch([ws], k, method="gram")[0]
            res = {}
            batch8 = [wt.clone() for _ in range(8)]
            runs = {
                "gram64": lambda: truncated_svd_batch([wt], k, method="gram")[0],
                "gram64 ×8": lambda: truncated_svd_batch(batch8, k, method="gram")[0],
                "g32→eigh64": lambda: gram_variant(wt, k, torch.float32, torch.float64),
                "g32 eigh32": lambda: gram_variant(wt, k, torch.float32, torch.float32),
                "g64 evr k": lambda: gram_evr(wt, k, torch.float64),
                "g32 evr k": lambda: gram_evr(wt, k, torch.float32),
                "warm-start 1": lambda: warm_start(wt, k, fs, 1),
                "warm-start 2": lambda: warm_start(wt, k, fs, 2),
                "randomized": lambda: truncated_svd_batch([wt], k, method="randomized", seed=args.seed)[0],
                "svd32": lambda: svd32(wt, k),
                "svd32 tall": lambda: svd32(wt, k, tall=True),
            }
            for meth, fn in runs.items():
                t, f = best_and_result(fn, args.repeat)
                if meth == "gram64 ×8":
                    t /= 8
                err = tr.rel_error(project_lorax(delta, f), ref)
                res[meth] = (t, err)
                totals[meth] += t * 2 * len(keys)
            del batch8
            # Reading, hashing and cache steps.
            io = {}
            buf = wt.contiguous().view(torch.uint8).numpy()
            io["digest"] = best(lambda: weight_digest(wt.view(wt.shape)), args.repeat)  # new tensor: no memo
            io["blake2b nocopy"] = best(lambda: hashlib.blake2b(buf, digest_size=16).hexdigest(), args.repeat)
            io["sha1 nocopy"] = best(lambda: hashlib.sha1(buf).hexdigest(), args.repeat)
            io["sha256 nocopy"] = best(lambda: hashlib.sha256(buf).hexdigest(), args.repeat)
            path = tmp / "w.safetensors"
            from safetensors.torch import save_file
            save_file({"model.diffusion_model.x.weight": wt}, str(path))
            sw = SafetensorsWeights(path)
            # safetensors maps tensors lazily: the clone is what reads the bytes (from the page cache).
            io["read (per call open)"] = best(lambda: sw.weight("diffusion_model.x.weight").clone(),
                                              args.repeat)
            with open_safetensors(path) as fh:
                io["read (open handle)"] = best(lambda: fh.get_tensor("model.diffusion_model.x.weight").clone(),
                                                args.repeat)
            cache = SVDCache(tmp / "cache")
            f = SVDEngine("gram").rounded(truncated_svd_batch([wt], k, method="gram")[0])  # as the engine stores it
            cache.put("d" * 32, "gram", f)
            io["cache get"] = best(lambda: cache.get("d" * 32, "gram", k), args.repeat)
            entry = cache.entries()[0][0]
            with open_safetensors(entry) as fh:
                io["cache raw read"] = best(lambda: [fh.get_tensor(x).clone() for x in ("U", "S", "V")],
                                            args.repeat)
            for s in io_steps:
                io_totals[s] += io[s] * 2 * len(keys)
            print(f"\n{name} (stored {tuple(shape)}), k = {k}, {len(keys)} layers of this class per model")
            for meth in methods:
                t, err = res[meth]
                print(f"  {meth:<14} {t:8.4f} s  ×{res['gram64'][0] / t:6.2f} vs gram64   err {err:.1e}")
            print("  I/O steps: " + ", ".join(f"{s} {io[s] * 1e3:.1f} ms" for s in io_steps))
            sys.stdout.flush()
        print(f"\nextrapolated to all {len(layers)} layers × 2 models of {args.model}:")
        for meth in methods:
            print(f"  {meth:<14} {totals[meth]:8.1f} s")
        print("  I/O steps: " + ", ".join(f"{s} {io_totals[s]:.1f} s" for s in io_steps))
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
