"""``bench/transfer.py``'s runs: one model through each route (the Gram route cold and warm, the
randomized one, the naive exact baseline), the float64 reference the errors are measured against,
and the per-shape profile of the Gram route."""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from lorax.delta import Delta  # noqa: E402
from lorax.engine import SVDEngine  # noqa: E402
from lorax.fingerprint import weight_digest  # noqa: E402
from lorax.projection import project_lorax  # noqa: E402
from lorax.safetensors_weights import SafetensorsWeights  # noqa: E402
from lorax.similarity import layer_similarity  # noqa: E402
from lorax.svd import SVDFactors, canonical_signs, weight_matrix  # noqa: E402
from lorax.svd_cache import SVDCache  # noqa: E402
from lorax.transfer import Decision, TransferSettings, transfer_deltas  # noqa: E402

from measure import (Measure, as_float32_cache, best, drop_from_page_cache, measured,  # noqa: E402
                     read_into_page_cache, release_memory, rss_bytes)
from transfer_models import (BENCH_SETTINGS, DEFAULT_REF_PER_SHAPE, DEFAULT_RUNS, Synth, block_kind,  # noqa: E402
                             make_adapter, model_files, model_layers, subset_label)


def engine_options(args) -> dict:
    """The SVDEngine options the command line overrides (none: the library's defaults)."""
    out = {}
    if args.memo_mb is not None:
        out["memory_bytes"] = int(args.memo_mb * (1 << 20))
    if args.workers is not None:
        out["workers"] = args.workers
    return out


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def _top(U, S, Vh, k) -> SVDFactors:
    return SVDFactors(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].mT.contiguous())


def naive_exact_transfer(deltas, source, target, settings: TransferSettings, device) -> tuple[dict, int]:
    """The straightforward implementation: full float32 SVDs of both weights per layer, no cache."""
    moved: dict[str, Delta] = {}
    svds = 0
    for key, delta in deltas.items():
        shape = source.shape(key)
        k = settings.rank_for(shape)
        fs = _top(*torch.linalg.svd(weight_matrix(source.weight(key).to(device), torch.float32),
                                    full_matrices=False), k)
        ft = _top(*torch.linalg.svd(weight_matrix(target.weight(key).to(device), torch.float32),
                                    full_matrices=False), k)
        svds += 2
        sim = layer_similarity(fs, ft, k)
        if sim.phi_hat_min < settings.threshold:
            continue
        moved[key] = project_lorax(delta, ft).to(device="cpu", dtype=torch.float32)
    return moved, svds


def read_pass(keys, source, target, digest: bool) -> None:
    # safetensors returns memory-mapped tensors: the clone is what makes the bytes be read.
    for key in keys:
        for w in (source, target):
            t = w.weight(key).clone()
            if digest:
                weight_digest(t)
            del t


@dataclass
class Row:
    model: str
    layers: int
    method: str
    measure: Measure
    warm: bool = False
    svds: int | None = None
    moved: int | None = None
    errors: list[float] = field(default_factory=list)
    note: str = ""
    part_seconds: dict = field(default_factory=dict)   # wall seconds per block kind (extrapolation)
    cache_bytes: int = 0
    cache_read: int | None = None                       # bytes of cache entries read (warm runs)


def rel_error(run: Delta | None, ref: Delta) -> float:
    if run is None:
        return 1.0
    A = run.matrix().double()
    B = ref.matrix().double()
    return float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B))


def reference_sample(layers, per_shape: int) -> list[str]:
    by_shape: dict[tuple, list[str]] = {}
    for key, shape in layers:
        by_shape.setdefault(tuple(shape), []).append(key)
    keys = []
    for shape, ks in by_shape.items():
        n = min(per_shape, len(ks))
        picks = sorted({round(i * (len(ks) - 1) / max(1, n - 1)) for i in range(n)})
        keys.extend(ks[i] for i in picks)
    return keys


def svd64_top(w: torch.Tensor, k: int) -> SVDFactors:
    """Exact float64 top-k (LAPACK is much faster on tall than on wide matrices: transpose)."""
    M = weight_matrix(w, torch.float64)
    if M.shape[0] < M.shape[1]:
        U, S, Vh = torch.linalg.svd(M.mT, full_matrices=False)
        return SVDFactors(Vh[:k].mT.contiguous(), S[:k].contiguous(), U[:, :k].contiguous())
    return _top(*torch.linalg.svd(M, full_matrices=False), k)


def build_reference(model, layers, deltas, source, target, settings, per_shape, seed, log):
    """Exact float64 projected deltas on a sample, and the float16 storage floor (module docstring)."""
    t0 = time.perf_counter()
    shapes = dict(layers)
    sample = reference_sample(layers, per_shape)
    refs: dict[str, Delta] = {}
    for key in sample:
        k = settings.rank_for(shapes[key])
        ft = svd64_top(target.weight(key), k)
        refs[key] = project_lorax(deltas[key], ft)
    floor = []
    synth = Synth(seed)
    seen = set()
    for key in sample:
        shape = tuple(shapes[key])
        if shape in seen:
            continue
        seen.add(shape)
        k = settings.rank_for(shape)
        _, _, (U, S, V) = synth.layer(model, key, shape, with_target=False, with_svd=True)
        exact = SVDFactors(U[:, :k], S[:k], V[:, :k])
        stored = svd64_top(source.weight(key), k)
        floor.append((shape, rel_error(project_lorax(deltas[key], exact), project_lorax(deltas[key], stored)),
                      float((stored.S - S[:k]).abs().max() / S[0])))
    del synth
    log(f"  reference: exact float64 SVD of {len(sample)} target layers ({per_shape} per shape class, "
        f"evenly spaced in key order) in {time.perf_counter() - t0:.1f} s")
    return refs, floor


def run_model(model: str, args, device: torch.device, folder: Path, log) -> tuple[list[Row], dict]:
    layers = model_layers(model, args)
    per_shape = DEFAULT_REF_PER_SHAPE[model] if args.ref_per_shape is None else args.ref_per_shape
    info: dict = {"model": model, "layers": len(layers), "ref_per_shape": per_shape,
                  "params": sum(math.prod(s) for _, s in layers)}
    log(f"\n== {model}{subset_label(model, args)}: {len(layers)} layers, "
        f"{len({tuple(s) for _, s in layers})} shape classes, {info['params'] / 1e9:.2f} B parameters, "
        f"stored {args.dtype}")
    subset = "-".join(map(str, args.flux_blocks)) if model == "flux" else ("quick" if args.quick else "")
    src_path, tgt_path, made_s = model_files(model, layers, args.seed, subset, folder, log, args.dtype)
    if made_s:
        log(f"  made in {made_s:.1f} s")
    info["file_gb"] = os.path.getsize(src_path) / 1e9
    source, target = SafetensorsWeights(src_path), SafetensorsWeights(tgt_path)
    deltas = make_adapter(model, layers, args.seed)
    settings = BENCH_SETTINGS
    refs, floor = build_reference(model, layers, deltas, source, target, settings, per_shape, args.seed, log)
    info["floor"] = floor
    info["ref_keys"] = list(refs)
    release_memory()
    info["rss_before_runs"] = rss_bytes()
    keys = [k for k, _ in layers]
    shapes = dict(layers)
    min_free = int(args.min_free_gb * (1 << 30))
    rows: list[Row] = []
    runs = args.runs if args.runs is not None else {r for r in DEFAULT_RUNS[model].split(",")}
    # Flux: the double and the single blocks go through the engine one after the other and are
    # timed apart, to extrapolate to the full model per layer class (module docstring).
    parts: dict[str, dict[str, Delta]] = {}
    for key, d in deltas.items():
        parts.setdefault(block_kind(key), {})[key] = d

    def errors_of(moved: dict[str, Delta]) -> list[float]:
        return [rel_error(moved.get(key), ref) for key, ref in refs.items()]

    def worst(errors: list[float]) -> str:
        if not errors:
            return ""
        i = max(range(len(errors)), key=errors.__getitem__)
        key = list(refs)[i]
        return f"; worst sample layer {key[len('diffusion_model.'):]} {tuple(shapes[key])}: {errors[i]:.1e}"

    def svd_run(method: str, cache_dir: Path, warm: bool, label: str | None = None, run_settings=None,
                **engine_kw) -> Row:
        store = SVDCache(cache_dir, **({} if args.cache_gb is None else {"max_bytes": int(args.cache_gb * (1 << 30))}))
        engine = SVDEngine(method=method, device=device, store=store, seed=args.seed, **engine_options(args),
                           **engine_kw)
        label = label or f"{method} {'warm' if warm else 'cold'}"
        log(f"  {label} …")
        res = None
        part_seconds = {}
        try:
            with measured(device, min_free_bytes=min_free) as m:
                res = []
                for kind, part in parts.items():
                    t0 = time.perf_counter()
                    res += transfer_deltas(part, source, target, run_settings or settings, engine).layers
                    part_seconds[kind] = time.perf_counter() - t0
        except KeyboardInterrupt:
            if not m.aborted:
                raise
            res = None
        moved = {} if res is None else {l.key: l.delta for l in res if l.decision is Decision.TRANSFERRED}
        # The float64 reference projects with lorax: another mode's deltas are not comparable to it.
        comparable = res is not None and (run_settings or settings).mode == settings.mode
        row = Row(model, len(layers), label, m, warm=warm, svds=engine.stats.layers_decomposed,
                  moved=None if res is None else len(moved), errors=errors_of(moved) if comparable else [],
                  part_seconds=part_seconds)
        cache_bytes = row.cache_bytes = store.size_bytes()
        row.cache_read = store.bytes_read
        row.note = (("ABORTED by the " + m.aborted + "; " if m.aborted else "") +
                    f"{engine.stats.svd_calls} SVD calls ({engine.stats.peak_workers} side by side at most), "
                    f"{engine.stats.disk_hits} cache hits, SVD time {engine.stats.seconds:.1f} s; cache "
                    f"{len(store.entries())} entries, {cache_bytes / 1e9:.2f} GB (limit {store.max_bytes / 1e9:.2f} GB), "
                    f"read {store.bytes_read / 1e9:.2f} GB of it, storage reads "
                    f"{'?' if m.io_read is None else f'{m.io_read / 1e9:.2f}'} GB; "
                    f"engine memo {engine.memo_bytes / 1e9:.2f} GB ({engine.factor_dtype})" + worst(row.errors) +
                    ("" if len(part_seconds) < 2 else
                     "; " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in part_seconds.items())))
        log(f"    {m.seconds:.1f} s; {row.note}")
        del res, moved, engine
        return row

    if "read" in runs:
        log("  read only …")
        with measured(device) as m:
            read_pass(keys, source, target, digest=False)
        rows.append(Row(model, len(layers), "read only", m, note="every source and target weight read once"))
        log(f"    {m.seconds:.1f} s")
        log("  read+digest …")
        with measured(device) as m:
            read_pass(keys, source, target, digest=True)
        rows.append(Row(model, len(layers), "read+digest", m, note="read + weight_digest (blake2b) of each"))
        log(f"    {m.seconds:.1f} s")
    cache_root = Path(tempfile.mkdtemp(prefix=f"svdcache-{model}-", dir=folder))
    gram_dir = cache_root / "gram"
    if args.svd_cache_dir:
        # A kept cache of an earlier cold run of the same files: reused, so warm runs can be repeated.
        gram_dir = Path(args.svd_cache_dir) / f"{model}{'-' + subset if subset else ''}-seed{args.seed}-gram"
    try:
        reused = gram_dir.is_dir() and any(gram_dir.glob("*.svd.safetensors"))
        if reused:
            log(f"  gram cold: reusing the SVD cache in {gram_dir} (--svd-cache-dir)")
        if "gram" in runs and not reused:
            rows.append(svd_run("gram", gram_dir, warm=False))
        if "gram" in runs:
            if "warm" in runs:
                # Before (float32 entries) and now (float16), each from the disk and from the page cache.
                as_float32_cache(gram_dir, cache_root / "gram-f32")
                # Wait until the copy (6.8 GB for SDXL) is on the disk: its writeback would otherwise
                # compete with the disk runs below (measured: a float16 disk run took 38-54 s right
                # after the copy was written, 6.2-7.3 s on its own).
                os.sync()
                for where in ("disk", "page cache"):
                    for folder, label, kw in ((cache_root / "gram-f32", "gram warm f32", {"stored_dtype": torch.float32}),
                                              (gram_dir, "gram warm", {})):
                        if where == "disk":
                            drop_from_page_cache(folder)
                        rows.append(svd_run("gram", folder, warm=True, label=f"{label} ({where})", **kw))
                # The nodes' default projection (prolora), which reads the source's factors as well
                # (not read by the lorax runs before: brought into the page cache first).
                read_into_page_cache(gram_dir)
                rows.append(svd_run("gram", gram_dir, warm=True, label="gram warm prolora (page cache)",
                                    run_settings=replace(settings, mode="prolora")))
                # The same warm run where the similarities were not remembered (factors cached by
                # another transfer, say): Φ computed from both sides' factors, as before they were kept.
                forgetful = cache_root / "gram-no-scores"
                forgetful.mkdir()
                for path in gram_dir.iterdir():
                    if path.name != "scores.log":
                        os.link(path, forgetful / path.name)
                rows.append(svd_run("gram", forgetful, warm=True, label="gram warm, Φ computed (page cache)"))
        if "randomized" in runs:
            rows.append(svd_run("randomized", cache_root / "randomized", warm=False))
        if "modes" in runs:
            # The default transfer of the day (auto: copy the layers that barely moved, with no SVD) against
            # the default before it (prolora), cold then warm, each on a fresh cache of its own.
            for mode in ("prolora", "auto"):
                folder = cache_root / f"mode-{mode}"
                mode_settings = replace(settings, mode=mode)
                rows.append(svd_run("gram", folder, warm=False, label=f"{mode} cold", run_settings=mode_settings))
                rows.append(svd_run("gram", folder, warm=True, label=f"{mode} warm (page cache)",
                                    run_settings=mode_settings))
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    if "baseline" in runs:
        log("  naive svd32 baseline …")
        with measured(device, min_free_bytes=min_free) as m:
            moved, svds = naive_exact_transfer(deltas, source, target, settings, device)
        errs = errors_of(moved)
        rows.append(Row(model, len(layers), "naive svd32", m, svds=svds, moved=len(moved), errors=errs,
                        note="full float32 torch.linalg.svd of source and target per layer, no cache" + worst(errs)))
        log(f"    {m.seconds:.1f} s")
        del moved
    return rows, info


# --------------------------------------------------------------------------------------------
# Profile of the gram route, per shape class
# --------------------------------------------------------------------------------------------


def profile_model(model: str, args, folder: Path, log) -> None:
    """Time each step of one gram-route layer (source or target) per shape class, best of
    ``--repeat``, and extrapolate to the model: steps × layers of the class × 2 (both models)."""
    layers = model_layers(model, args)
    subset = "-".join(map(str, args.flux_blocks)) if model == "flux" else ("quick" if args.quick else "")
    src_path, tgt_path, _ = model_files(model, layers, args.seed, subset, folder, log, args.dtype)
    target = SafetensorsWeights(tgt_path)
    source = SafetensorsWeights(src_path)
    settings = BENCH_SETTINGS
    deltas = make_adapter(model, layers, args.seed)
    by_shape: dict[tuple, list[str]] = {}
    for key, shape in layers:
        by_shape.setdefault(tuple(shape), []).append(key)
    steps = ["read", "digest", "upcast64", "gram64", "eigh64", "V=AᵀU/σ", "signs", "cache put", "cache get",
             "Φ̂+project", "engine 1", "engine ×8/8"]
    total = dict.fromkeys(steps, 0.0)
    cache_dir = Path(tempfile.mkdtemp(prefix="svdcache-profile-", dir=folder))
    r = args.repeat
    print(f"\nprofile of the gram route, {model}{subset_label(model, args)}: seconds per layer "
          f"(best of {r}), × count = layers of the class in both models")
    head = f"{'shape':>16} {'k':>4} {'count':>5} " + " ".join(f"{s:>11}" for s in steps)
    print(head)
    try:
        store = SVDCache(cache_dir, max_bytes=1 << 40)
        for shape, ks in by_shape.items():
            key = ks[0]
            k = settings.rank_for(shape)
            w = target.weight(key)
            t = {}
            t["read"] = best(lambda: target.weight(key).clone(), r)  # mapped lazily: clone reads
            t["digest"] = best(lambda: weight_digest(w.view(w.shape)), r)  # a new tensor: no memo hit
            t["upcast64"] = best(lambda: weight_matrix(w, torch.float64), r)
            M = weight_matrix(w, torch.float64)
            A = M.mT if M.shape[0] > M.shape[1] else M
            t["gram64"] = best(lambda: A @ A.mT, r)
            G = A @ A.mT
            t["eigh64"] = best(lambda: torch.linalg.eigh(G), r)
            ev, vec = torch.linalg.eigh(G)
            U = vec[:, -k:].flip(-1).contiguous()
            S = ev[-k:].flip(-1).clamp_min(0).sqrt()
            t["V=AᵀU/σ"] = best(lambda: (A.mT @ U) / S, r)
            V = (A.mT @ U) / S
            t["signs"] = best(lambda: canonical_signs(U, V), r)
            f = SVDEngine("gram").rounded(SVDFactors(V, S, U) if M.shape[0] > M.shape[1] else SVDFactors(U, S, V))
            digest = weight_digest(w)
            t["cache put"] = best(lambda: store.put(digest, "gram", f), r)
            t["cache get"] = best(lambda: store.get(digest, "gram", k), r)
            f32 = store.get(digest, "gram", k)
            fs = SVDEngine("gram").factors(source.weight(key), k)
            t["Φ̂+project"] = best(lambda: (layer_similarity(fs, f32, k), project_lorax(deltas[key], f32)), r)
            t["engine 1"] = best(lambda: SVDEngine("gram").factors(w.view(w.shape), k), r)
            ws = [target.weight(kk) for kk in (ks * 8)[:8]]
            t["engine ×8/8"] = best(lambda: SVDEngine("gram", batch_size=8).factors_many([(x, k) for x in ws]), r) / 8
            del ws, M, A, G, vec, V, U
            count = 2 * len(ks)
            for s in steps:
                total[s] += t[s] * count
            print(f"{str(shape):>16} {k:>4} {count:>5} " + " ".join(f"{t[s]:>11.4f}" for s in steps), flush=True)
        print(f"{'model total s':>28} " + " ".join(f"{total[s]:>11.1f}" for s in steps))
        print("  (engine 1 = SVDEngine('gram').factors on one in-memory weight: digest + upcast + gram + eigh + V + "
              "signs; engine ×8/8 = one batch of 8 weights of the class, per weight)")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
