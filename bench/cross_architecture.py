#!/usr/bin/env python3
"""Benchmark of a transfer across architectures: SDXL → SSD-1B through a similarity layer map (not a test).

SSD-1B is SDXL with transformer blocks removed: its 1280-wide input transformers keep 4 of
SDXL's 10 blocks, its middle block has no transformer, and its output transformers are 4, 4, 10
(1280 wide) and 2, 1, 1 (640 wide) blocks deep where SDXL's are 10 and 2 (the layout
stable-diffusion.cpp builds for SSD-1B; ComfyUI tells SSD-1B apart by the input depths). The
synthetic target keeps evenly spaced source blocks — each the 5 % fine-tune of its source block
from ``bench/transfer.py``'s construction (power-law spectra, float16 files with ComfyUI
checkpoint keys, written layer by layer) — renumbered 0, 1, … as in the real model.

Runs, in one process on the same files:

* ``cold`` — :func:`lorax.layer_map.build_layer_map` in similarity mode over the roles a random
  rank-32 LoRA on all 722 SDXL layers touches (each role whose layer counts differ has every
  candidate pair scored by Φ̂), then :func:`lorax.transfer.transfer_deltas` through the map,
  with a fresh :class:`~lorax.svd_cache.SVDCache`: every layer read, hashed, decomposed, cached.
* ``warm`` — the same with a new engine on the same cache: nothing is decomposed.

Printed per run: wall time, peak extra RSS, SVDs run, the map's accuracy (matched target layers
paired with the source layer they were made from), layers transferred, and the largest relative
error of the transferred deltas against the float64 reference — the exact top-k projection of the
*true* source block's delta onto the target layer — on a sample of two layers per shape class.

Usage::

    .venv/bin/python bench/cross_architecture.py [--quick] [--cache-dir DIR] [--keep-files] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import measure  # noqa: E402  (bench/transfer.py's parts; bench/ is sys.path[0])
import transfer_models as tm  # noqa: E402
import transfer_routes as tr  # noqa: E402

from lorax.engine import SVDEngine  # noqa: E402
from lorax.layer_map import build_layer_map, role_of  # noqa: E402
from lorax.projection import project_lorax  # noqa: E402
from lorax.safetensors_weights import SafetensorsWeights  # noqa: E402
from lorax.svd_cache import SVDCache  # noqa: E402
from lorax.transfer import Decision, similarity_scorer, transfer_deltas  # noqa: E402

SDXL = tm.UNET_CONFIGS["sdxl"]
SSD1B = {**SDXL, "transformer_depth": [0, 0, 2, 2, 4, 4], "transformer_depth_middle": 0,
         "transformer_depth_output": [0, 0, 0, 1, 1, 2, 10, 4, 4]}
#: --quick: these transformers only (one that keeps 4 of 10 blocks, one that keeps 1 of 2).
QUICK = ("input_blocks.8.1", "output_blocks.4.1")
_IN_BLOCK = re.compile(r"^diffusion_model\.(.+?)\.transformer_blocks\.(\d+)\.(.+)$")


def transformer_layers(cfg: dict, quick: bool) -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, int]]:
    """Every attention, feed-forward and proj weight of a UNet configuration, and each
    transformer's depth (``bench/transfer.py`` derives both from ComfyUI's block numbering)."""
    depths = {prefix: depth for prefix, _, depth in tm.spatial_transformers(cfg)}
    layers = [(key, shape) for key, shape in tm.config_layers(cfg)
              if not quick or key[len("diffusion_model."):].startswith(tuple(q + "." for q in QUICK))]
    return layers, depths


def kept_blocks(source_depth: int, target_depth: int) -> list[int]:
    """Evenly spaced source blocks a shallower target keeps (all of them at equal depth)."""
    if target_depth == 1:
        return [source_depth - 1]
    return [round(i * (source_depth - 1) / (target_depth - 1)) for i in range(target_depth)]


def origin_of(key: str, source_depths: dict[str, int], target_depths: dict[str, int]) -> str:
    """The source layer a target layer was made from."""
    m = _IN_BLOCK.match(key)
    if not m:
        return key
    prefix, block, rest = m.group(1), int(m.group(2)), m.group(3)
    return f"diffusion_model.{prefix}.transformer_blocks.{kept_blocks(source_depths[prefix], target_depths[prefix])[block]}.{rest}"


def make_target(path: Path, layers, origins: dict[str, str], source_shapes: dict, seed: int, log) -> None:
    """The SSD-1B-shaped file: each layer the fine-tuned copy of the source layer it came from."""
    synth = tm.Synth(seed)
    names = [(tm.CHECKPOINT_PREFIX + key[len("diffusion_model."):], shape) for key, shape in layers]
    writer = tm.StreamingSafetensorsWriter(path, names, {"bench": "bench/cross_architecture.py SSD-1B-shaped target"})
    try:
        for (key, shape), (name, _) in zip(layers, names):
            origin = origins[key]
            _, wt, _ = synth.layer("sdxl", origin, source_shapes[origin])
            writer.write(name, wt.to(torch.float16).reshape(shape))
        writer.close()
    except BaseException:
        writer.abort()
        raise


def run(label, deltas, source, target, settings, cache_dir: Path, origins, refs, log) -> dict:
    engine = SVDEngine(method="gram", store=SVDCache(cache_dir))
    roles = {role_of(k, d.shape) for k, d in deltas.items()}

    def shapes(w):
        return {k: w.shape(k) for k in w.keys() if len(w.shape(k)) >= 2 and role_of(k, w.shape(k)) in roles}

    log(f"  {label} …")
    with measure.measured(torch.device("cpu")) as m:
        lmap = build_layer_map(shapes(source), shapes(target), mode="similarity",
                               scorer=similarity_scorer(source, target, engine, settings.rank))
        result = transfer_deltas(deltas, source, target, settings, engine, layer_map=lmap)
    matched = [(t, s) for s, t in lmap.pairs()]
    right = sum(1 for t, s in matched if origins[t] == s)
    moved = {l.target: l.delta for l in result.layers if l.decision is Decision.TRANSFERRED}
    errors = [tr.rel_error(moved.get(t), ref) for t, ref in refs.items()]
    out = {"label": label, "seconds": m.seconds, "rss": m.extra_rss, "svds": engine.stats.layers_decomposed,
           "hits": engine.stats.disk_hits, "matched": len(matched), "right": right, "moved": len(moved),
           "errors": errors, "unmatched": len(lmap.unmatched)}
    log(f"    {m.seconds:.1f} s; {lmap.summary()}; {len(moved)} moved; {engine.stats.layers_decomposed} SVDs, "
        f"{engine.stats.disk_hits} cache hits")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only the transformers {', '.join(QUICK)} (~1 min)")
    p.add_argument("--cache-dir", help="where the synthetic models and SVD caches go (default: a temp folder)")
    p.add_argument("--keep-files", action="store_true", help="keep the files in --cache-dir for the next run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folder = Path(args.cache_dir or tempfile.mkdtemp(prefix="lorax-bench-xarch-"))
    folder.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    load0 = os.getloadavg()[0]
    try:
        src_layers, src_depths = transformer_layers(SDXL, args.quick)
        tgt_layers, tgt_depths = transformer_layers(SSD1B, args.quick)
        src_shapes = dict(src_layers)
        origins = {key: origin_of(key, src_depths, tgt_depths) for key, _ in tgt_layers}
        log(f"SDXL → SSD-1B{' (quick)' if args.quick else ''}: {len(src_layers)} source layers, "
            f"{len(tgt_layers)} target layers, in {folder}")
        src_path, _, made = tm.model_files("sdxl", src_layers, args.seed, args.quick, folder, log)
        tgt_path = folder / f"ssd1b{'-quick' if args.quick else ''}-seed{args.seed}-target.safetensors"
        if not tgt_path.exists():
            make_target(tgt_path, tgt_layers, origins, src_shapes, args.seed, log)
        source, target = SafetensorsWeights(src_path), SafetensorsWeights(tgt_path)
        deltas = tm.make_adapter("sdxl", src_layers, args.seed)
        settings = tm.BENCH_SETTINGS
        refs = {}
        for key in tr.reference_sample(tgt_layers, 2):
            refs[key] = project_lorax(deltas[origins[key]], tr.svd64_top(target.weight(key), settings.rank_for(src_shapes[origins[key]])))
        log(f"  reference: exact float64 projections of {len(refs)} target layers")
        cache = folder / f"svd-cache-{os.getpid()}"
        rows = [run("cold", deltas, source, target, settings, cache, origins, refs, log),
                run("warm", deltas, source, target, settings, cache, origins, refs, log)]
        shutil.rmtree(cache, ignore_errors=True)
    finally:
        if not args.keep_files and not args.cache_dir:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\nSDXL → SSD-1B{' (quick subset)' if args.quick else ''}: {len(src_layers)} source layers, "
          f"{len(tgt_layers)} target layers (kept source blocks evenly spaced, 5 % fine-tunes), LoRA rank "
          f"{tm.LORA_RANK} on every source layer; TransferSettings defaults with mode lorax, layer map by similarity")
    print(f"{'run':<5} | {'s':>7} | {'peak extra RSS MB':>17} | {'SVDs':>5} | {'cache hits':>10} | "
          f"{'map right':>11} | {'moved':>9} | {'max rel err':>11}")
    for r in rows:
        print(f"{r['label']:<5} | {r['seconds']:7.1f} | {r['rss'] / 2**20:17.0f} | {r['svds']:5d} | {r['hits']:10d} | "
              f"{r['right']:>4}/{r['matched']:<6} | {r['moved']:>4}/{len(tgt_layers):<4} | {max(r['errors']):11.2e}")
    print(f"machine: {measure.cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), Python {platform.python_version()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; code: {measure.git_state()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
