#!/usr/bin/env python3
"""Performance benchmark of a LoRA-X transfer on SD1.5-, SDXL- and Flux-shaped checkpoints (not a test).

What it measures, per model (``--models sd15,sdxl``), on one device (``--device cpu|cuda``):

* ``gram cold``   — :func:`lorax.transfer.transfer_deltas` with ``SVDEngine(method="gram")`` and a
  fresh :class:`lorax.svd_cache.SVDCache` in an empty folder: every source and target layer is
  read, hashed, decomposed and written to the cache.
* ``gram warm``   — a NEW engine on the same cache folder: should decompose nothing (the
  ``SVDs`` column is ``engine.stats.layers_decomposed``). The cache stores U and V in float16
  (:mod:`lorax.svd_cache`). Beside it, ``gram warm f32`` is the same warm run over the format the
  cache used before (cache version 1: float32 U, σ, V): the cold run's entries rewritten at float32
  into a second folder (same bytes per entry and the same validation as before; the numbers are
  the float16-rounded ones, so its errors equal the float16 run's). Each warm format runs twice:
  ``(disk)`` after its entries were dropped from the page cache (``posix_fadvise(DONTNEED)`` on
  this run's own files only) and ``(page cache)`` right after. ``read GB`` = bytes of cache entries
  the run read (``SVDCache.bytes_read``) / bytes the process read from storage (``/proc/self/io``
  ``read_bytes``, page-cache hits not counted). The cold run remembered every layer pair's
  similarity (``scores.log``), so a warm run computes no Φ and, with the ``lorax`` projection,
  reads only the target's factors; ``gram warm, Φ computed`` is the same run on a copy of the
  cache without ``scores.log`` (factors cached, similarities not: both sides read, Φ computed),
  and ``gram warm prolora`` the warm run with the nodes' default projection, which needs the
  source's factors too (its deltas differ from the ``lorax`` reference, so no error is shown).
* ``randomized cold`` — the same as the first with ``method="randomized"`` and its own fresh cache.
* ``prolora cold/warm`` and ``auto cold/warm`` (``--runs modes``) — the transfer modes of
  :mod:`lorax.transfer` side by side, each cold on a fresh cache and then warm on it: ``prolora`` (the
  default before 0.3.0) decomposes every layer; ``auto`` (the default since) copies the layers whose
  target weight lies within 50 % of the source's norm without decomposing them — on the synthetic
  5 % fine-tune, every layer — and transports the rest. Their deltas differ from the ``lorax``
  reference, so no error is shown.
* ``naive svd32`` — the straightforward implementation, as the baseline: for every layer a full
  ``torch.linalg.svd`` (float32, ``full_matrices=False``) of the source and of the target weight,
  no cache, then the same Φ̂ test and the same projection (:func:`lorax.projection.project_lorax`
  with the top-k factors). Same process, same weight reader.
* ``read only`` / ``read+digest`` — a pass that only reads every source and target weight through
  :class:`~lorax.safetensors_weights.SafetensorsWeights` (and, in the second, hashes it with
  :func:`lorax.fingerprint.weight_digest`): what a run that reads and hashes every weight pays
  (the cold run does; a warm run finds its cache entries by the files' identity and reads
  neither). The first pass also brings the files into the page cache, so later runs read from
  memory (as long as the machine has the memory to keep them there).

Columns: wall seconds (``cold s`` / ``warm s``), ``×baseline`` = baseline seconds / run seconds
(> 1: faster than the baseline), ``cpu s`` = the process's CPU time (user + system) during the
run and ``×baseline cpu`` the same ratio on CPU time — less disturbed than wall time when other
processes compete for the cores (wall time then includes the time the process waited for a core),
``peak extra RSS MB`` = the largest resident set sampled every
20 ms during the run (``/proc/self/statm``) minus the resident set at the run's start (after
``gc`` and ``malloc_trim``), and the max / median relative error ``‖ΔW_run − ΔW_ref‖_F / ‖ΔW_ref‖_F``
of the projected deltas over the reference sample (below). A layer a run did not transfer counts
as error 1. ``moved`` = layers transferred / layers, ``cpu%`` = process CPU time / (wall × cores)
(below 100 % on a quiet machine too: not every step is parallel), ``load`` = the 1-minute load
average at the end of the run (other processes on the machine make timings noisy; look at it).
On ``--device cuda`` an ``extra VRAM MB`` column reports ``torch.cuda.max_memory_allocated``
minus the allocation at the run's start.

Synthetic checkpoints
---------------------
Real layer shapes and ComfyUI key names: every ``SpatialTransformer`` of the UNet, derived (not
typed in) from the UNet configurations of ComfyUI 0.3.75 ``comfy/model_detection.py`` by the
block-numbering loop of ``comfy/ldm/modules/diffusionmodules/openaimodel.py`` (``--verify-keys``
instantiates ComfyUI's ``UNetModel`` on the meta device and checks the list key by key). Per
transformer: ``proj_in`` and ``proj_out`` (1×1 conv ``c×c×1×1`` in SD1.5, linear ``c×c`` in SDXL)
and per transformer block ``attn1.to_q/to_k/to_v/to_out.0`` (``c×c``), ``attn2.to_q/to_out.0``
(``c×c``), ``attn2.to_k/to_v`` (``c×context``, 768 / 2048), ``ff.net.0.proj`` (``8c×c``, GEGLU) and
``ff.net.2`` (``c×4c``). That gives 192 layers for SD1.5 (widths 320: input 1,2 / output 9,10,11;
640: input 4,5 / output 6,7,8; 1280: input 7,8 / middle / output 3,4,5; depth 1) and 722 for SDXL
(640: input 4,5 and output 3,4,5, depth 2; 1280: input 7,8, middle and output 0,1,2, depth 10;
the output blocks are numbered from the deepest level, so SDXL's 640-wide ones are 3,4,5).

Source weights have a power-law spectrum ``σ_i ∝ i^-0.8`` with an exactly known SVD, built
cheaply: per matrix shape one random orthonormal pair ``U₀, V₀`` (QR of a Gaussian, float64) and
``W₀ = U₀ diag(σ) V₀ᵀ`` once; per layer a random row permutation P, column permutation Q and
sign flips D₁, D₂, ``W_s = D₁ P W₀ Qᵀ D₂`` — whose SVD is ``(D₁PU₀) diag(σ) (D₂QV₀)ᵀ``, so every
layer differs and nothing but an index and a sign flip is computed per layer. Entries have an
rms of 0.02. The target is a fine-tune of the source, the model the tests use
(``tests/model_builders.py:fine_tune``): ``W_t = W_s + D`` with ``‖D‖_F = 5 % ‖W_s‖_F``, half of the energy
a random rank-8 change and half dense Gaussian. Both are stored as float16 safetensors files with
ComfyUI checkpoint keys (``model.diffusion_model.…``; SD1.5 ≈ 0.7 GB and SDXL ≈ 4.2 GB per file),
written layer by layer (never a whole model in memory) into ``--cache-dir`` (default: a temporary
folder removed at exit unless ``--keep-files``; files with the same specification are reused) and
read back layer by layer through ``SafetensorsWeights``. The runs' SVD caches are made in fresh
folders next to the models and removed after each model's runs (``--svd-cache-dir`` keeps the gram
run's, and a later run with the same option reuses it instead of a cold run).

The adapter is a random LoRA of rank 32 on every one of these layers (``lorax.delta.Delta``,
factored, float32). Settings are :data:`BENCH_SETTINGS`: the :class:`lorax.transfer.TransferSettings`
defaults (k = 320 capped at half the layer's rank, Φ̂ ≥ 0.3 on both sides) with mode ``lorax``, the
paper's projection, which the float64 reference below uses too; the default mode ``prolora`` needs
the same decompositions and adds two thin products per layer.

The exact reference
-------------------
The target's SVD is not known analytically (source + perturbation), and the stored float16 weights
are not the float64 matrices whose SVD is known either. The reference is therefore the exact
float64 path on the weights *as stored*: a full float64 ``torch.linalg.svd`` of the target weight
read from the file (upcast), top-k, and ``project_lorax`` in float64. Its cost is that of the
baseline times ~10, so it is computed on a documented sample: ``--ref-per-shape`` layers
(default 2) of every distinct layer shape, evenly spaced in key order (first and last of each shape
class), printed before the table. Errors of all runs are measured on that sample.

Also printed, as a yardstick for what accuracy is meaningful: the *float16 storage floor*, the
relative change of the projected delta when the analytically known top-k basis of the float64
source is replaced by the exact top-k basis of the same source after float16 rounding (one layer
per shape). With σ_i ∝ i^-0.8 neighbouring singular values at i = 320 differ by only 0.25 %, so
rounding noise already mixes the directions around the cut-off.

Targets (from the "Performance" issue; printed as PASS/MISS, misses are not hidden), on the CPU:
``gram cold`` ≥ 8× faster than the naive exact baseline at max relative error ≤ 1e-2; ``gram warm``
on SDXL shapes ≤ 10 s; peak extra RSS ≤ 1.5 GB (the models are not held in memory) for the LoRA-X
runs; the warm run decomposes nothing.

Noisy machines
--------------
Timings are only as good as the machine is quiet: the ``load`` and ``cpu%`` columns say how much
of the cores the run got. With torch's default OpenMP settings a busy machine is much worse than
"a share of the cores": OpenMP threads spin-wait at every barrier, and when one of them has been
descheduled a 0.2 s float64 ``eigh`` of a 1280 × 1280 matrix was measured at 1.6–29 s (2 threads,
two other CPU-bound processes). ``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts) brought it
back to 0.55–0.6 s under the same load, as did ``--threads 1``. The table prints the policy in
use. CPU time (``cpu s``) is the steadier measure under load with the passive policy; with the
default (active) policy it also counts the spinning.

Flux
----
``--models flux``: the layers LoRA trainers adapt in Flux.1's blocks, with the real shapes and
ComfyUI key names (hidden 3072 = 24 heads of 128, MLP 4 × 3072, as ComfyUI 0.3.75's model detection
sets them; ``--verify-keys`` checks them against ComfyUI's ``Flux`` class): per double block and
stream (``img``/``txt``) ``_mod.lin`` (18432 × 3072), ``_attn.qkv`` (9216 × 3072, fused), ``_attn.proj``
(3072²), ``_mlp.0`` (12288 × 3072), ``_mlp.2`` (3072 × 12288); per single block ``linear1`` (21504 × 3072,
fused q, k, v and MLP input), ``linear2`` (3072 × 15360), ``modulation.lin`` (9216 × 3072). Flux.1 has
19 double and 38 single blocks — 304 layers, 11.9 B parameters, 24 GB per model in float16 — so the
benchmark runs a **block subset**, ``--flux-blocks D,S`` (default 1,1: the first D double and S single
blocks, every layer class of the model, 13 layers, 0.48 B parameters), and *extrapolates* to the
full model per layer class: every double block has the same layers, as has every single block, so
the time of a full run is ``19/D × (time of the double blocks) + 38/S × (time of the single blocks)``,
timed separately within the run. The peak extra memory does not grow with the number of blocks (a
few layers in flight, ``max_batch_bytes``, and the engine's bounded memo), which the figure of the
subset shows; the on-disk SVD cache does grow, and its size for the full model is printed.
``--dtype fp8`` stores the weights as ``float8_e4m3fn`` (what most people run Flux in): each layer is
upcast on its own. Defaults for Flux: runs ``read,gram,warm`` (the naive baseline would add a float32
SVD of 26 matrices up to 21504 × 3072) and no float64 reference sample (``--ref-per-shape 1`` adds one
layer per shape class, minutes each here; the tests check Flux-width layers against closed-form SVDs).

Usage::

    .venv/bin/python bench/transfer.py --quick                       # ~1-2 min sanity run
    .venv/bin/python bench/transfer.py --models flux --dtype fp8     # Flux, 1 double + 1 single block
    .venv/bin/python bench/transfer.py --models sd15                 # full SD1.5
    .venv/bin/python bench/transfer.py --models sdxl --cache-dir /tmp/lorax-bench --keep-files
    .venv/bin/python bench/transfer.py --models sd15 --profile       # where the gram route's time goes
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/transfer.py ...   # on a machine shared with other jobs

Deterministic: ``--seed`` fixes weights, adapter and the randomized method's seed.

The script is :func:`main`; the work is in modules by concern: ``bench/transfer_models.py`` (the
layer lists and the synthetic weights), ``bench/transfer_routes.py`` (the runs and the profile),
``bench/transfer_report.py`` (the table) and ``bench/measure.py`` (time and memory, shared by
the other benchmarks).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from measure import rss_bytes  # noqa: E402
from transfer_models import FLUX_BLOCKS, MODELS, STORAGE, verify_keys  # noqa: E402
from transfer_report import print_table  # noqa: E402
from transfer_routes import profile_model, run_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl, flux (default sd15,sdxl)")
    p.add_argument("--quick", action="store_true", help="one transformer block per width (~1-2 min in all)")
    p.add_argument("--flux-blocks", default="1,1",
                   help="Flux block subset D,S: the first D double and S single blocks (default 1,1; 19,38 is the "
                        "full model, ~24 GB per file in fp16); times are extrapolated to 19,38 per block kind")
    p.add_argument("--dtype", default="fp16", choices=list(STORAGE),
                   help="how the synthetic weights are stored (default fp16; fp8 = float8_e4m3fn)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cache-dir", help="where the synthetic models (and the SVD caches) go; files with the "
                                       "same specification are reused (default: a temporary folder)")
    p.add_argument("--keep-files", action="store_true",
                   help="keep the synthetic models at exit (the SVD caches are always removed)")
    p.add_argument("--runs", default=None,
                   help="which runs: read, gram, warm, randomized, baseline, modes (default all but modes; "
                        "read,gram,warm for flux)")
    p.add_argument("--cache-gb", type=float, default=None,
                   help="SVD cache size limit in GiB (default: the library's default, 16)")
    p.add_argument("--svd-cache-dir", default=None,
                   help="keep the gram run's SVD cache in this folder (one subfolder per model), and reuse it "
                        "instead of a cold run when it is already there: warm runs without a new cold run")
    p.add_argument("--memo-mb", type=float, default=None,
                   help="SVDEngine(memory_bytes=…) in MiB: factors the engine keeps in memory (default: the "
                        "library's default)")
    p.add_argument("--workers", type=int, default=None,
                   help="SVDEngine(workers=…): decompositions side by side on the CPU (default: the "
                        "library's default, torch.get_num_threads())")
    p.add_argument("--ref-per-shape", type=int, default=None,
                   help="reference layers per shape class (default 2; 0 for flux)")
    p.add_argument("--profile", action="store_true", help="profile the gram route per shape class instead")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per profiled step (best is kept)")
    p.add_argument("--verify-keys", action="store_true",
                   help="check the derived keys against ComfyUI's UNetModel (needs the ComfyUI tree)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-free-gb", type=float, default=2.0,
                   help="memory guard: stop a run (reported as ABORTED) when the machine's available "
                        "memory falls below this (default 2; 0 = off)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    try:
        args.flux_blocks = tuple(int(x) for x in args.flux_blocks.split(","))
        if len(args.flux_blocks) != 2 or not (1 <= args.flux_blocks[0] <= FLUX_BLOCKS[0]
                                              and 1 <= args.flux_blocks[1] <= FLUX_BLOCKS[1]):
            raise ValueError
    except ValueError:
        p.error(f"--flux-blocks must be D,S with 1 ≤ D ≤ {FLUX_BLOCKS[0]} and 1 ≤ S ≤ {FLUX_BLOCKS[1]}")
    if args.runs is not None:
        args.runs = {r.strip() for r in args.runs.split(",") if r.strip()}
        bad = args.runs - {"read", "gram", "warm", "randomized", "baseline", "modes"}
        if bad:
            p.error(f"unknown runs {sorted(bad)}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load_start = os.getloadavg()[0]
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch has no CUDA device here")
    torch.manual_seed(args.seed)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.verify_keys:
        verify_keys(models)
    if args.cache_dir:
        folder = Path(args.cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        remove = False
    else:
        folder = Path(tempfile.mkdtemp(prefix="lorax-bench-"))
        remove = not args.keep_files
    log(f"files in {folder}{' (removed at exit)' if remove else ''}; load average {os.getloadavg()[0]:.1f}")
    try:
        if args.profile:
            for model in models:
                profile_model(model, args, folder, log)
            return 0
        rss0 = rss_bytes()
        rows, infos = [], []
        for model in models:
            r, info = run_model(model, args, device, folder, log)
            rows += r
            infos.append(info)
        print_table(rows, infos, device, args, rss0)
    finally:
        if remove:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
