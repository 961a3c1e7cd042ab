#!/usr/bin/env python3
"""Cold and warm LoRA-X transfers on the widest DiT families, today's route against the wide one (not a test).

Qwen-Image, Wan 2.2 A14B and Z-Image have layers 3072, 5120 and 3840 wide, where the Gram route's
full ``s × s`` eigendecomposition (``O(s³)``) dominates a transfer. This benchmark times, in one
process and on the same files, a transfer of a random rank-32 LoRA on every attention and MLP layer
of a block subset with

* ``gram cold``      — today's route for every layer: ``SVDEngine(wide_from=None)``, a fresh SVD cache;
* ``subspace cold``  — the engine's defaults, which take the ``subspace`` route for these shapes
  (:mod:`lorax.svd`: float32 subspace iteration on the Gram matrix, then Rayleigh–Ritz), a
  fresh SVD cache;
* ``subspace warm``  — a new engine with the defaults on the second cache: no decomposition.

With ``--per-shape N``, before those runs, one layer of each shape class of the target is also decomposed
by both routes alone, one thread, ``N`` times each and in turn (gram, subspace, gram, …): the medians
and their ratio per shape, free of the drift between whole runs (the Gram route's time moved 15–30 %
between runs on this machine), and the products the route took. ``--targets`` adds, per shape, the
route at other values of the error its estimate must reach before it stops
(:data:`lorax.svd.SUBSPACE_TARGET_ERROR`, a quarter of the budget): products, seconds and route error,
to show what a looser budget would buy. ``--skip-transfers`` leaves out the whole runs.

Columns as in ``bench/transfer.py`` (whose helpers this reuses: the synthetic weights, the files,
the adapter, the measurements): wall seconds, CPU seconds, peak extra RSS beyond the process
before the run (models memory-mapped), and errors.

Layers (ComfyUI 0.3.75 model code, keys as ComfyUI names them in a checkpoint):

* **Qwen-Image** (``comfy/ldm/qwen_image/model.py``; 24 heads × 128 = 3072, 60 blocks): per
  ``transformer_blocks.i``: ``attn.to_q/to_k/to_v``, ``attn.to_out.0``, ``attn.add_q_proj/add_k_proj/
  add_v_proj``, ``attn.to_add_out`` (3072²), ``img_mlp.net.0.proj`` / ``txt_mlp.net.0.proj``
  (12288 × 3072, GELU ``mult=4``) and ``img_mlp.net.2`` / ``txt_mlp.net.2`` (3072 × 12288).
* **Wan 2.2 A14B** (``comfy/ldm/wan/model.py``, dim 5120, ffn 13824, 40 blocks, two experts — the
  high- and low-noise models, each a full 40-block checkpoint): per ``blocks.i``:
  ``self_attn.q/k/v/o`` and ``cross_attn.q/k/v/o`` (5120²; text features are projected to 5120
  first), ``ffn.0`` (13824 × 5120) and ``ffn.2`` (5120 × 13824).
* **Z-Image** (``comfy/ldm/lumina/model.py`` NextDiT as ``model_detection.py`` configures it for
  dim 3840: 30 heads, 30 kv heads, ``ffn_dim_multiplier`` 8/3, ``multiple_of`` 256; 30 layers):
  per ``layers.i``: ``attention.qkv`` (fused, 3 × 3840 = 11520 × 3840), ``attention.out`` (3840²),
  ``feed_forward.w1`` / ``w3`` (10240 × 3840) and ``w2`` (3840 × 10240).

Only ``--blocks`` blocks (default 1) are made and timed; a block's attention and MLP layers go
through the engine separately and the full-model times are extrapolated per block kind as the
Flux rows of ``bench/transfer.py`` are: ``blocks in the model / blocks run × time of that kind``
(× 2 for Wan's two experts). Every layer of a kind has the same shape in every block, so this is
the cost model, not a guess; memory does not grow with the number of blocks.

Weights: ``bench/transfer.py``'s construction — source with σ_i ∝ i^-0.8 and an exactly known SVD,
target its 5 % fine-tune (half rank-8, half dense), both stored in float16, k = 320.

Errors (the accuracy budget of the wide route is :data:`lorax.svd.SUBSPACE_ERROR_BUDGET`, 2e-4):

* ``err`` of a run: max over a sample of one layer per shape class of
  ``‖ΔW_run − ΔW_ref‖_F / ‖ΔW_ref‖_F``, the run's projected delta (factors rounded to float16 as the
  engine keeps them) against the projection with the float64 reference factors of the stored target.
  The reference is the float64 Gram route (``truncated_svd(method="gram")``, unrounded): the full
  float64 SVD of a 5120-wide layer costs minutes here, and the Gram route agrees with it to ~1e-13
  (checked on the first sample layer, printed).
* ``route err``: the same for the wide route's float64 factors *before* rounding — what the route
  itself adds — and ``Φ̂ err``, ``|Φ̂_route − Φ̂_ref|`` on one square layer per family (source and
  target both decomposed both ways).
* ``fp16 floor``: what storing the weights in float16 already does, as ``bench/transfer.py`` prints
  it (the known top-k of the float64 source against the reference top-k of the stored source),
  on the same square layer.

Usage::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/wide_families.py            # all three, 1 block each
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/wide_families.py --families qwen --blocks 2
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/wide_families.py --per-shape 3 --targets 1e-4,2e-4 --skip-transfers
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import lorax.svd as svd  # noqa: E402  (the per-shape rows read the route's product count and vary its target)

import measure  # noqa: E402  (bench/transfer.py's parts; bench/ is sys.path[0])
import transfer_models as tm  # noqa: E402
import transfer_routes as tr  # noqa: E402

from lorax.engine import SVDEngine, _one_thread_each  # noqa: E402  (per_shape runs on one thread as the engine's workers do)
from lorax.projection import project_lorax  # noqa: E402
from lorax.safetensors_weights import SafetensorsWeights  # noqa: E402
from lorax.similarity import layer_similarity  # noqa: E402
from lorax.svd import SUBSPACE_ERROR_BUDGET, WIDE_FROM, SVDFactors, truncated_svd  # noqa: E402
from lorax.svd_cache import SVDCache  # noqa: E402
from lorax.transfer import Decision, transfer_deltas  # noqa: E402

# (blocks in the model, models per LoRA: Wan 2.2 A14B's two experts are two checkpoints)
FAMILIES = {"qwen": ("Qwen-Image", 60, 1), "wan": ("Wan 2.2 A14B", 40, 2), "zimage": ("Z-Image", 30, 1)}
QWEN_DIM, QWEN_MLP = 3072, 4 * 3072
WAN_DIM, WAN_FFN = 5120, 13824
Z_DIM, Z_HEADS, Z_KV_HEADS = 3840, 30, 30
Z_FFN = 256 * ((int(8.0 / 3.0 * Z_DIM) + 255) // 256)  # lumina FeedForward: 10240


def family_layers(family: str, blocks: int) -> list[tuple[str, tuple[int, int]]]:
    """``(key, shape)`` of the attention and MLP layers of the first ``blocks`` blocks (module docstring)."""
    out = []
    for i in range(blocks):
        if family == "qwen":
            b, h = f"diffusion_model.transformer_blocks.{i}", QWEN_DIM
            out += [(f"{b}.attn.{n}.weight", (h, h)) for n in
                    ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
            for stream in ("img_mlp", "txt_mlp"):
                out += [(f"{b}.{stream}.net.0.proj.weight", (QWEN_MLP, h)), (f"{b}.{stream}.net.2.weight", (h, QWEN_MLP))]
        elif family == "wan":
            b, h = f"diffusion_model.blocks.{i}", WAN_DIM
            out += [(f"{b}.{a}.{n}.weight", (h, h)) for a in ("self_attn", "cross_attn") for n in "qkvo"]
            out += [(f"{b}.ffn.0.weight", (WAN_FFN, h)), (f"{b}.ffn.2.weight", (h, WAN_FFN))]
        elif family == "zimage":
            b, h = f"diffusion_model.layers.{i}", Z_DIM
            head = Z_DIM // Z_HEADS
            out += [(f"{b}.attention.qkv.weight", ((Z_HEADS + 2 * Z_KV_HEADS) * head, h)),
                    (f"{b}.attention.out.weight", (h, h)),
                    (f"{b}.feed_forward.w1.weight", (Z_FFN, h)), (f"{b}.feed_forward.w2.weight", (h, Z_FFN)),
                    (f"{b}.feed_forward.w3.weight", (Z_FFN, h))]
        else:
            raise ValueError(family)
    return out


def kind_of(key: str) -> str:
    """``attention`` or ``mlp``: the block kind a layer's time is extrapolated by."""
    return "attention" if (".attn." in key or "_attn." in key or ".attention." in key) else "mlp"


def gram64(weight: torch.Tensor, k: int) -> SVDFactors:
    return truncated_svd(weight, k, method="gram")


@contextlib.contextmanager
def counted_products():
    """The products with the Gram matrix each ``subspace`` decomposition took, as a list appended to.
    The count lives inside the route (:func:`lorax.svd._subspace_basis`), so this wraps it for the
    duration: a benchmark's look inside, not an interface."""
    inner, counts = svd._subspace_basis, []

    def counting(*args, **kwargs):
        Q, products = inner(*args, **kwargs)
        counts.append(products)
        return Q, products

    with mock.patch.object(svd, "_subspace_basis", counting):
        yield counts


def estimate_target(value: float):
    """The route with another :data:`lorax.svd.SUBSPACE_TARGET_ERROR` (read at each call) for the duration."""
    return mock.patch.object(svd, "SUBSPACE_TARGET_ERROR", value)


def per_shape(target, sample: list[str], shapes: dict, deltas: dict, refs: dict, settings, repeat: int,
              targets: list[float]) -> list[dict]:
    """Both routes on one layer per shape class, alone and on one thread, ``repeat`` times each in turn;
    then the route at each of ``targets`` (module docstring)."""
    rows = []
    with _one_thread_each():
        for key in sample:
            weight, k = target.weight(key), settings.rank_for(shapes[key])
            times = {"gram": [], "subspace": []}
            with counted_products() as counts:
                for _ in range(repeat):
                    for method in times:
                        t0 = time.perf_counter()
                        truncated_svd(weight, k, method=method)
                        times[method].append(time.perf_counter() - t0)
            gram, sub = (statistics.median(times[m]) for m in ("gram", "subspace"))
            row = {"shape": tuple(shapes[key]), "gram": gram, "subspace": sub, "products": sorted(set(counts)),
                   "spread": {m: (min(v), max(v)) for m, v in times.items()}, "targets": []}
            print(f"  {row['shape'][0]}×{row['shape'][1]}, one thread, {repeat} each in turn: gram "
                  f"{', '.join(f'{x:.2f}' for x in times['gram'])} s, subspace {', '.join(f'{x:.2f}' for x in times['subspace'])} s"
                  f" ({'/'.join(map(str, row['products']))} products): {gram / sub:.2f}× (medians)", flush=True)
            for value in targets:
                with counted_products() as counts, estimate_target(value):
                    t0 = time.perf_counter()
                    f = truncated_svd(weight, k, method="subspace")
                    seconds = time.perf_counter() - t0
                err = tr.rel_error(project_lorax(deltas[key], f), refs[key])
                products = counts[0] if counts else None
                row["targets"].append((value, products, seconds, err))
                print(f"    estimate target {value:.0e}: {products or '-'} products, {seconds:.2f} s "
                      f"({gram / seconds:.2f}× the gram median), route error {err:.1e}", flush=True)
            rows.append(row)
            del weight
            measure.release_memory()
    return rows


def run(label: str, engine: SVDEngine, parts: dict, source, target, settings) -> dict:
    """One transfer of every part (timed apart) through ``engine``; returns what the table needs."""
    print(f"  {label} …", flush=True)
    part_seconds, moved = {}, {}
    with measure.measured(torch.device("cpu")) as m:
        for kind, deltas in parts.items():
            t0 = time.perf_counter()
            res = transfer_deltas(deltas, source, target, settings, engine)
            part_seconds[kind] = time.perf_counter() - t0
            moved.update({r.key: r.delta for r in res.layers if r.decision is Decision.TRANSFERRED})
    print(f"    {m.seconds:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in part_seconds.items())}); "
          f"cpu {m.cpu_seconds:.1f} s, peak extra RSS {m.extra_rss / 2**20:.0f} MB, load {m.load_end:.2f}; "
          f"{engine.stats.layers_decomposed} decomposed {engine.stats.routes}, {engine.stats.disk_hits} cache hits, "
          f"{engine.stats.peak_workers} side by side", flush=True)
    return {"label": label, "m": m, "parts": part_seconds, "moved": moved, "decomposed": engine.stats.layers_decomposed,
            "routes": dict(engine.stats.routes)}


def family(fam: str, args, folder: Path) -> dict:
    name, total_blocks, models = FAMILIES[fam]
    layers = family_layers(fam, args.blocks)
    shapes = dict(layers)
    print(f"\n== {name}: {args.blocks} of {total_blocks} blocks, {len(layers)} layers, "
          f"{sum(math.prod(s) for _, s in layers) / 1e9:.2f} B parameters per model, float16", flush=True)
    src, tgt, made = tm.model_files(fam, layers, args.seed, f"{args.blocks}b", folder, print)
    if made:
        print(f"  made in {made:.1f} s")
    source, target = SafetensorsWeights(src), SafetensorsWeights(tgt)
    deltas = tm.make_adapter(fam, layers, args.seed)
    settings = tm.BENCH_SETTINGS
    parts: dict[str, dict] = {}
    for key, d in deltas.items():
        parts.setdefault(kind_of(key), {})[key] = d

    # The sample (one layer per shape class) and its references.
    sample, seen = [], set()
    for key, shape in layers:
        if shape not in seen:
            seen.add(shape)
            sample.append(key)
    square = next(key for key in sample if shapes[key][0] == shapes[key][1])
    t0 = time.perf_counter()
    ref_t = {key: gram64(target.weight(key), settings.rank_for(shapes[key])) for key in sample}
    refs = {key: project_lorax(deltas[key], ref_t[key]) for key in sample}
    route_t = {key: truncated_svd(target.weight(key), settings.rank_for(shapes[key]), method="subspace")
               for key in sample}
    route_err = {key: tr.rel_error(project_lorax(deltas[key], route_t[key]), refs[key]) for key in sample}
    k = settings.rank_for(shapes[square])
    ref_s = gram64(source.weight(square), k)
    route_s = truncated_svd(source.weight(square), k, method="subspace")
    phi_err = abs(layer_similarity(route_s, route_t[square], k).phi_hat_min
                  - layer_similarity(ref_s, ref_t[square], k).phi_hat_min)
    synth = tm.Synth(args.seed)
    _, _, (U, S, V) = synth.layer(fam, square, shapes[square], with_target=False, with_svd=True)
    floor = tr.rel_error(project_lorax(deltas[square], SVDFactors(U[:, :k], S[:k], V[:, :k])),
                         project_lorax(deltas[square], ref_s))
    del synth, U, S, V
    check = sample[0] if fam in args.check_exact.split(",") else None
    exact_vs_gram = None
    if check is not None:
        ex = tr.svd64_top(target.weight(check), settings.rank_for(shapes[check]))
        exact_vs_gram = tr.rel_error(refs[check], project_lorax(deltas[check], ex))
        del ex
    print(f"  references in {time.perf_counter() - t0:.1f} s: route error (float64 factors) "
          + ", ".join(f"{tuple(shapes[key])} {route_err[key]:.1e}" for key in sample)
          + f"; Φ̂ error {phi_err:.1e} and fp16 floor {floor:.1e} on {square.split('.', 1)[1]}"
          + ("" if exact_vs_gram is None else f"; float64 Gram vs full float64 SVD {exact_vs_gram:.1e}"), flush=True)
    del ref_t, route_t, ref_s, route_s
    measure.release_memory()
    shape_rows = (per_shape(target, sample, shapes, deltas, refs, settings, args.per_shape, args.targets)
                  if args.per_shape else [])

    rows = []
    cache_root = Path(tempfile.mkdtemp(prefix=f"wide-{fam}-", dir=folder))
    try:
        runs = [("gram cold", lambda: SVDEngine(store=SVDCache(cache_root / "gram"), seed=args.seed, wide_from=None)),
                ("subspace cold", lambda: SVDEngine(store=SVDCache(cache_root / "subspace"), seed=args.seed)),
                ("subspace warm", lambda: SVDEngine(store=SVDCache(cache_root / "subspace"), seed=args.seed))]
        if args.order == "new-first":
            runs = [runs[1], runs[0], runs[2]]
        for label, make in ([] if args.skip_transfers else runs):
            row = run(label, make(), parts, source, target, settings)
            row["err"] = max(tr.rel_error(row["moved"].get(key), refs[key]) for key in sample)
            print(f"    max relative error of the projected deltas {row['err']:.1e}", flush=True)
            del row["moved"]
            rows.append(row)
            measure.release_memory()
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    return {"family": fam, "name": name, "blocks": args.blocks, "total_blocks": total_blocks, "models": models,
            "layers": len(layers), "rows": rows, "route_err": max(route_err.values()), "phi_err": phi_err,
            "floor": floor, "exact_vs_gram": exact_vs_gram,
            "per_shape": {tuple(shapes[key]): route_err[key] for key in sample}, "shape_rows": shape_rows}


def print_runs(results: list[dict]) -> None:
    """The whole cold and warm runs, extrapolated."""
    print("\n| family (block subset) | run | cold/warm s | cpu s | × gram cold | peak extra RSS MB | max rel. err "
          "| extrapolated, attention layers | extrapolated, attention + MLP |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for res in results:
        gram = next(r for r in res["rows"] if r["label"] == "gram cold")
        scale = res["total_blocks"] / res["blocks"] * res["models"]
        for r in res["rows"]:
            m = r["m"]
            att = scale * r["parts"].get("attention", 0.0)
            full = scale * sum(r["parts"].values())
            print(f"| {res['name']} ({res['blocks']} of {res['total_blocks']} blocks, {res['layers']} layers) | "
                  f"{r['label']} | {m.seconds:.1f} | {m.cpu_seconds:.1f} | {gram['m'].seconds / m.seconds:.2f}× | "
                  f"{m.extra_rss / 2**20:.0f} | {r['err']:.1e} | {att / 60:.1f} min | {full / 60:.1f} min |")


def print_shapes(results: list[dict]) -> None:
    """The per-shape rows (--per-shape), if any."""
    shape_rows = [(res["name"], r) for res in results for r in res["shape_rows"]]
    if shape_rows:
        targets = [t[0] for t in shape_rows[0][1]["targets"]]
        print("\n| family | shape | gram (median, range) | subspace (median, range) | products | × gram |"
              + "".join(f" estimate target {v:.0e}: products, s, × gram, route err |" for v in targets))
        print("| --- " * (6 + len(targets)) + "|")
        for name, r in shape_rows:
            lo_g, hi_g = r["spread"]["gram"]
            lo_s, hi_s = r["spread"]["subspace"]
            print(f"| {name} | {r['shape'][0]} × {r['shape'][1]} | {r['gram']:.2f} s ({lo_g:.2f}–{hi_g:.2f}) | "
                  f"{r['subspace']:.2f} s ({lo_s:.2f}–{hi_s:.2f}) | "
                  f"{'/'.join(map(str, r['products']))} | {r['gram'] / r['subspace']:.2f}× |"
                  + "".join(f" {p}, {sec:.2f} s, {r['gram'] / sec:.2f}×, {e:.1e} |" for _, p, sec, e in r["targets"]))


def print_table(results: list[dict], load_before: tuple) -> None:
    if any(res["rows"] for res in results):
        print_runs(results)
    print_shapes(results)
    print("\nper family: route error (float64 factors, before rounding) per shape; Φ̂ error; fp16 floor:")
    for res in results:
        print(f"  {res['name']}: " + ", ".join(f"{s[0]}×{s[1]} {e:.1e}" for s, e in res["per_shape"].items())
              + f"; Φ̂ {res['phi_err']:.1e}; fp16 floor {res['floor']:.1e}"
              + ("" if res["exact_vs_gram"] is None else f"; float64 Gram vs float64 SVD {res['exact_vs_gram']:.1e}"))
    worst = max(res["route_err"] for res in results)
    print(f"  budget {SUBSPACE_ERROR_BUDGET:.0e}: {'PASS' if worst <= SUBSPACE_ERROR_BUDGET else 'MISS'} "
          f"(worst {worst:.1e})")
    print(f"\nCPU {measure.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, wide_from {WIDE_FROM}; "
          f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {measure.git_state()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="qwen,zimage,wan", help="comma-separated: qwen, wan, zimage")
    p.add_argument("--blocks", type=int, default=1, help="blocks made and timed per family (default 1)")
    p.add_argument("--cache-dir", help="where the synthetic models go (reused when present); default a temporary folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", choices=["gram-first", "new-first"], default="gram-first")
    p.add_argument("--per-shape", type=int, default=0, metavar="N",
                   help="also time both routes on one layer per shape, alone on one thread, N times each in turn")
    p.add_argument("--targets", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                   help="with --per-shape: comma-separated estimate targets to run the route at as well (e.g. 1e-4,2e-4)")
    p.add_argument("--skip-transfers", action="store_true", help="leave out the whole cold and warm runs")
    p.add_argument("--check-exact", default="qwen",
                   help="families where the float64 Gram reference is compared with a full float64 SVD of one "
                        "layer (default qwen: minutes per layer for the wider ones; '' for none)")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    folder = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="lorax-wide-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{measure.cpu_model()}; load average {' '.join(f'{x:.2f}' for x in load_before)}; files in {folder}")
    try:
        results = [family(f.strip(), args, folder) for f in args.families.split(",") if f.strip()]
    finally:
        if not args.cache_dir:
            shutil.rmtree(folder, ignore_errors=True)
    print_table(results, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
