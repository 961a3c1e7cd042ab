#!/usr/bin/env python3
"""Files per minute of ``python -m lorax transfer-many``: one process against Ray (local, N workers).

A benchmark script, not a test. Builds the demo models (the synthetic SD1.5-layout source and
its 5 % fine-tune, scripts/make-demo-models) and ``--files`` rank-8 LoRAs of the base on
overlapping layer sets (tests/library_models.py), then runs the command line as a user does:

* cold: an empty SVD cache, so the run includes every decomposition (each distinct layer once);
* warm: the same again with ``--overwrite`` on the cache the cold run left, so the run is the
  per-file work alone (read, transfer, write) plus the fixed start-up.

Wall time is the whole command (ComfyUI start, model loads; for Ray its start and the workers'
model loads too); files per minute = files written / wall time. The outputs of the Ray runs are
compared with the single-process ones (tensors bit for bit).

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/batch.py [--files 20] [--workers 2] [--every-layer]
       [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def run(argv, cache: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT), LORAX_SVD_CACHE=str(cache))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lorax", *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def same_outputs(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    if files != sorted(p.relative_to(b) for p in b.rglob("*.safetensors")):
        return False
    for rel in files:
        with safe_open(str(a / rel), "pt") as fa, safe_open(str(b / rel), "pt") as fb:
            if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
                return False
            if not all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()):
                return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--every-layer", action="store_true",
                   help="rank-32 LoRAs on every transformer linear layer (more work per file) instead of rank 8 "
                        "on 7 or 8 layers")
    p.add_argument("--work", help="folder for models, LoRAs and outputs (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lorax-bench-batch-"))
    demo = work / "demo"
    if not (demo / "target.safetensors").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make-demo-models"), str(demo)], check=True,
                       capture_output=True)
    import library_models as lm
    from safetensors.torch import load_file

    loras = work / "loras"
    shutil.rmtree(loras, ignore_errors=True)
    source_sd = load_file(str(demo / "source.safetensors"))
    rank = 32 if args.every_layer else 8
    lm.write_lora_batch(loras, source_sd, args.files, rank=rank, every_layer=args.every_layer)
    layers = (f"all {len(lm.transformer_linears(source_sd))} transformer linear layers each" if args.every_layer
              else f"7 or 8 layers each, {len(lm.LAYER_SETS)} overlapping layer sets")
    common = ["transfer-many", "--source", str(demo / "source.safetensors"), "--target",
              str(demo / "target.safetensors"), "--loras", str(loras)]
    print(f"{args.files} LoRAs (rank {rank}, {layers}) of the "
          f"demo SD1.5-layout model → its 5 % fine-tune; {os.cpu_count()} CPUs; torch threads per process: default")
    print(f"{'run':<34} {'wall s':>7} {'files/min':>9}  details")
    results = {}
    for label, extra, key in (("1 process", [], "one"), (f"Ray local, {args.workers} workers",
                                                         ["--ray", "--workers", str(args.workers)], "ray")):
        cache, out = work / f"cache-{key}", work / f"out-{key}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        for phase, more in (("cold", []), ("warm", ["--overwrite"])):
            wall, stdout = run(common + ["--out", str(out)] + extra + more, cache)
            written = int(re.search(r"(\d+) written", stdout).group(1))
            svd = re.search(r"^SVD: (.*?); total", stdout, re.M).group(1)
            results[(key, phase)] = wall
            print(f"{label + ', ' + phase:<34} {wall:7.1f} {60 * written / wall:9.1f}  {svd}", flush=True)
    print(f"Ray outputs equal the single process's bit for bit: {same_outputs(work / 'out-one', work / 'out-ray')}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
