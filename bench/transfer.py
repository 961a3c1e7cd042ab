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
(``tests/host.py:fine_tune``): ``W_t = W_s + D`` with ``‖D‖_F = 5 % ‖W_s‖_F``, half of the energy
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
"""

from __future__ import annotations

import _thread
import argparse
import ctypes
import gc
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
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
from lorax.safetensors_io import check_safetensors_file  # noqa: E402
from lorax.safetensors_weights import SafetensorsWeights  # noqa: E402
from lorax.similarity import layer_similarity  # noqa: E402
from lorax.svd import SVDFactors, canonical_signs, weight_matrix  # noqa: E402
from lorax.svd_cache import SVDCache  # noqa: E402
from lorax.transfer import Decision, TransferSettings, transfer_deltas  # noqa: E402

# --------------------------------------------------------------------------------------------
# The UNets: ComfyUI 0.3.75 comfy/model_detection.py (unet_config of SD15 and SDXL), only the
# fields that decide which transformer layers exist and their shapes.
# --------------------------------------------------------------------------------------------

UNET_CONFIGS = {
    "sd15": {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "context_dim": 768, "use_linear_in_transformer": False},
    "sdxl": {"model_channels": 320, "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "context_dim": 2048, "use_linear_in_transformer": True},
}
EXPECTED_LAYERS = {"sd15": 192, "sdxl": 722}
# --quick: one transformer per width (and only its first block), so every shape class is present.
QUICK_TRANSFORMERS = {"sd15": ["input_blocks.1.1", "input_blocks.4.1", "middle_block.1"],
                      "sdxl": ["input_blocks.4.1", "middle_block.1"]}

# Flux.1 (dev and schnell share the shapes): ComfyUI 0.3.75 comfy/model_detection.py sets 24 heads
# (rotary axes 16 + 56 + 56 = 128 per head, so hidden 3072) and mlp_ratio 4; 19 double, 38 single blocks.
FLUX_HIDDEN = 3072
FLUX_MLP = 4 * FLUX_HIDDEN
FLUX_BLOCKS = (19, 38)
MODELS = ("sd15", "sdxl", "flux")
DEFAULT_RUNS = {"sd15": "read,gram,warm,randomized,baseline", "sdxl": "read,gram,warm,randomized,baseline",
                "flux": "read,gram,warm"}
DEFAULT_REF_PER_SHAPE = {"sd15": 2, "sdxl": 2, "flux": 0}
STORAGE = {"fp16": (torch.float16, "F16"), "bf16": (torch.bfloat16, "BF16"), "fp8": (torch.float8_e4m3fn, "F8_E4M3")}

SPECTRUM_EXPONENT = 0.8     # σ_i ∝ i^-0.8
ENTRY_RMS = 0.02            # rms of a source weight's entries
FINE_TUNE_STRENGTH = 0.05   # ‖W_t − W_s‖_F / ‖W_s‖_F
FINE_TUNE_RANK = 8          # the low-rank part of the fine-tune
FINE_TUNE_DENSE_FRACTION = 0.5
LORA_RANK = 32
GENERATOR_VERSION = "1"     # bump when the construction changes: old files are then regenerated
CHECKPOINT_PREFIX = "model.diffusion_model."

#: What every run transfers with (module docstring).
BENCH_SETTINGS = TransferSettings(mode="lorax")

TARGET_SPEEDUP = 8.0
TARGET_ERROR = 1e-2
TARGET_WARM_SDXL_S = 10.0
TARGET_EXTRA_RSS_MB = 1.5 * 1024


def spatial_transformers(cfg: dict) -> list[tuple[str, int, int]]:
    """``(module prefix, width, depth)`` of every SpatialTransformer, numbered as
    ``UNetModel.__init__`` numbers its blocks (openaimodel.py): input block 0 is ``conv_in``, each
    level adds ``num_res_blocks`` blocks (ResBlock ``.0``, transformer ``.1``) and, except the last
    level, a downsample block; the middle block is ``[ResBlock, transformer, ResBlock]``; output
    blocks run from the deepest level up with ``num_res_blocks + 1`` blocks each, taking their
    depth from the *end* of ``transformer_depth_output`` (``.pop()``)."""
    mc = cfg["model_channels"]
    mults = cfg["channel_mult"]
    depth_in = list(cfg["transformer_depth"])
    depth_out = list(cfg["transformer_depth_output"])
    out = []
    idx = 1
    for level, mult in enumerate(mults):
        for _ in range(cfg["num_res_blocks"][level]):
            d = depth_in.pop(0)
            if d > 0:
                out.append((f"input_blocks.{idx}.1", mult * mc, d))
            idx += 1
        if level != len(mults) - 1:
            idx += 1
    if cfg["transformer_depth_middle"] > 0:
        out.append(("middle_block.1", mults[-1] * mc, cfg["transformer_depth_middle"]))
    idx = 0
    for level, mult in list(enumerate(mults))[::-1]:
        for _ in range(cfg["num_res_blocks"][level] + 1):
            d = depth_out.pop()
            if d > 0:
                out.append((f"output_blocks.{idx}.1", mult * mc, d))
            idx += 1
    return out


def unet_layers(model: str, quick: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """``(ComfyUI key, weight shape)`` of every attention, feed-forward and proj_in/out weight."""
    layers = config_layers(UNET_CONFIGS[model], QUICK_TRANSFORMERS[model] if quick else None)
    if not quick and len(layers) != EXPECTED_LAYERS[model]:
        raise SystemExit(f"derived {len(layers)} layers for {model}, expected {EXPECTED_LAYERS[model]}")
    return layers


def config_layers(cfg: dict, quick_transformers=None) -> list[tuple[str, tuple[int, ...]]]:
    """:func:`unet_layers` of a UNet configuration; with ``quick_transformers`` only those, one block deep."""
    ctx = cfg["context_dim"]
    proj = (lambda c: (c, c)) if cfg["use_linear_in_transformer"] else (lambda c: (c, c, 1, 1))
    layers = []
    for prefix, c, depth in spatial_transformers(cfg):
        if quick_transformers is not None:
            if prefix not in quick_transformers:
                continue
            depth = 1
        base = f"diffusion_model.{prefix}"
        layers.append((f"{base}.proj_in.weight", proj(c)))
        for d in range(depth):
            b = f"{base}.transformer_blocks.{d}"
            for name in ("to_q", "to_k", "to_v", "to_out.0"):
                layers.append((f"{b}.attn1.{name}.weight", (c, c)))
            layers.append((f"{b}.ff.net.0.proj.weight", (8 * c, c)))
            layers.append((f"{b}.ff.net.2.weight", (c, 4 * c)))
            layers.append((f"{b}.attn2.to_q.weight", (c, c)))
            layers.append((f"{b}.attn2.to_k.weight", (c, ctx)))
            layers.append((f"{b}.attn2.to_v.weight", (c, ctx)))
            layers.append((f"{b}.attn2.to_out.0.weight", (c, c)))
        layers.append((f"{base}.proj_out.weight", proj(c)))
    return layers


def flux_layers(double: int, single: int) -> list[tuple[str, tuple[int, ...]]]:
    """``(ComfyUI key, shape)`` of every linear layer in the first ``double`` double and ``single``
    single blocks of Flux.1 (module docstring)."""
    h, mlp = FLUX_HIDDEN, FLUX_MLP
    layers = []
    for i in range(double):
        for stream in ("img", "txt"):
            b = f"diffusion_model.double_blocks.{i}.{stream}"
            layers += [(f"{b}_mod.lin.weight", (6 * h, h)), (f"{b}_attn.qkv.weight", (3 * h, h)),
                       (f"{b}_attn.proj.weight", (h, h)), (f"{b}_mlp.0.weight", (mlp, h)),
                       (f"{b}_mlp.2.weight", (h, mlp))]
    for i in range(single):
        b = f"diffusion_model.single_blocks.{i}"
        layers += [(f"{b}.linear1.weight", (3 * h + mlp, h)), (f"{b}.linear2.weight", (h, h + mlp)),
                   (f"{b}.modulation.lin.weight", (3 * h, h))]
    return layers


def block_kind(key: str) -> str:
    """The layer class a key's time is extrapolated by: Flux's double or single blocks, or the whole UNet."""
    for kind in ("double_blocks", "single_blocks"):
        if f".{kind}." in key:
            return kind
    return "all"


def model_layers(model: str, args) -> list[tuple[str, tuple[int, ...]]]:
    if model == "flux":
        return flux_layers(*args.flux_blocks)
    return unet_layers(model, args.quick)


def subset_label(model: str, args) -> str:
    """How the model was cut down, for tables (empty for a full model)."""
    if model == "flux":
        d, s = args.flux_blocks
        return "" if (d, s) == FLUX_BLOCKS else f" ({d}+{s} of {FLUX_BLOCKS[0]}+{FLUX_BLOCKS[1]} blocks)"
    return " (quick)" if args.quick else ""


_VERIFY_FLUX_SNIPPET = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.ops
from comfy.ldm.flux.model import Flux
cfg = dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, out_channels=16,
           qkv_bias=True, in_channels=16, hidden_size=3072, context_in_dim=4096, patch_size=2, vec_in_dim=768,
           depth=19, depth_single_blocks=38, guidance_embed=True)
import dataclasses
from comfy.ldm.flux.model import FluxParams
if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:  # hosts after 0.3.75
    cfg["txt_ids_dims"] = []
m = Flux(**cfg, device="meta", operations=comfy.ops.disable_weight_init)
print(json.dumps({"diffusion_model." + k: list(v.shape) for k, v in m.state_dict().items()
                  if k.endswith(".weight") and v.dim() >= 2 and ("double_blocks" in k or "single_blocks" in k)}))
"""


_VERIFY_SNIPPET = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
out = {}
base = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
            in_channels=4, use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float16)
cfgs = json.loads(sys.argv[2])
for name, cfg in cfgs.items():
    kw = dict(base)
    kw.update({k: v for k, v in cfg.items()})
    kw.update(adm_in_channels=2816 if name == "sdxl" else None)
    if name == "sdxl":
        kw.update(num_classes="sequential", num_head_channels=64)
    else:
        kw.update(num_heads=8)
    m = UNetModel(**kw, device="meta", operations=comfy.ops.disable_weight_init)
    sd = m.state_dict()
    out[name] = {"diffusion_model." + k: list(v.shape) for k, v in sd.items()
                 if k.endswith(".weight") and v.dim() >= 2
                 and ("transformer_blocks" in k or ".proj_in." in k or ".proj_out." in k)}
print(json.dumps(out))
"""


def verify_keys(models: list[str]) -> None:
    """Compare the derived layer list with ComfyUI's own UNetModel built on the meta device."""
    tree = os.environ.get("COMFYUI_PATH") or str(Path.home() / ".cache" / "lorax-comfyui" / "ComfyUI-0.3.75")
    if not (Path(tree) / "comfy").is_dir():
        raise SystemExit(f"--verify-keys needs a ComfyUI tree ($COMFYUI_PATH or {tree}); run scripts/setup")
    cfgs = {m: UNET_CONFIGS[m] for m in models if m in UNET_CONFIGS}
    comfy = {}
    for snippet, arg, names in ((_VERIFY_SNIPPET, json.dumps(cfgs), list(cfgs)),
                                (_VERIFY_FLUX_SNIPPET, "", ["flux"] if "flux" in models else [])):
        if not names:
            continue
        res = subprocess.run([sys.executable, "-c", snippet, tree, arg],
                             capture_output=True, text=True, cwd=tempfile.gettempdir())
        if res.returncode != 0:
            raise SystemExit(f"--verify-keys: ComfyUI's model class could not be built:\n{res.stderr[-3000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        comfy.update(out if names != ["flux"] else {"flux": out})
    for model in models:
        ours = {k: list(s) for k, s in (flux_layers(*FLUX_BLOCKS) if model == "flux" else unet_layers(model))}
        theirs = comfy[model]
        missing = sorted(set(theirs) - set(ours))
        extra = sorted(set(ours) - set(theirs))
        wrong = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
        if missing or extra or wrong:
            raise SystemExit(f"--verify-keys {model}: missing {missing[:5]}, extra {extra[:5]}, "
                             f"wrong shapes {wrong[:5]}")
        what = "Flux" if model == "flux" else "UNetModel"
        print(f"verify-keys: {model}: all {len(ours)} keys and shapes match ComfyUI {tree}'s {what}")


# --------------------------------------------------------------------------------------------
# Synthetic weights
# --------------------------------------------------------------------------------------------


def _seed(*parts) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def _matrix_shape(shape) -> tuple[int, int]:
    return int(shape[0]), int(math.prod(shape[1:]))


class Synth:
    """Deterministic source/target weights with an exactly known source SVD (module docstring)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._bases: dict[tuple[int, int], tuple] = {}

    def basis(self, m: int, n: int):
        """``(U₀, σ, V₀, W₀)`` for one matrix shape; U₀, σ, V₀ float64, W₀ float32."""
        if (m, n) not in self._bases:
            g = torch.Generator().manual_seed(_seed(self.seed, "basis", m, n))
            r = min(m, n)
            U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
            V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
            S = torch.arange(1, r + 1, dtype=torch.float64) ** -SPECTRUM_EXPONENT
            S *= ENTRY_RMS * math.sqrt(m * n) / float(S.norm())
            W0 = ((U * S) @ V.mT).to(torch.float32)
            self._bases[(m, n)] = (U, S, V, W0)
        return self._bases[(m, n)]

    def layer(self, model: str, key: str, shape, *, with_target: bool = True, with_svd: bool = False):
        """``(W_s, W_t, (U, σ, V))`` as float32 matrices; W_t / the exact source SVD on request."""
        m, n = _matrix_shape(shape)
        U0, S, V0, W0 = self.basis(m, n)
        g = torch.Generator().manual_seed(_seed(self.seed, "layer", model, key))
        P = torch.randperm(m, generator=g)
        Q = torch.randperm(n, generator=g)
        d1 = (torch.randint(0, 2, (m,), generator=g) * 2 - 1).to(torch.float32)
        d2 = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float32)
        Ws = W0.index_select(0, P).index_select(1, Q)
        Ws.mul_(d1[:, None]).mul_(d2[None, :])
        Wt = None
        if with_target:
            norm = float(S.norm())
            r = min(FINE_TUNE_RANK, m, n)
            low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
            dense = torch.randn(m, n, generator=g)
            Wt = Ws + low.mul_(FINE_TUNE_STRENGTH * norm * math.sqrt(1 - FINE_TUNE_DENSE_FRACTION) / float(low.norm()))
            Wt.add_(dense.mul_(FINE_TUNE_STRENGTH * norm * math.sqrt(FINE_TUNE_DENSE_FRACTION) / float(dense.norm())))
            del low, dense
        svd = None
        if with_svd:
            svd = (U0.index_select(0, P) * d1.double()[:, None], S, V0.index_select(0, Q) * d2.double()[:, None])
        return Ws, Wt, svd


class StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor (header first), so no model sits in memory.

    The file is written to ``path + '.part'`` and renamed into place by :meth:`close`, so an
    interrupted generation never leaves a file that looks complete.
    """

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str],
                 storage: str = "fp16"):
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.dtype, code = STORAGE[storage]
        header: dict = {"__metadata__": metadata}
        offset = 0
        self._expected = []
        size = torch.empty((), dtype=self.dtype).element_size()
        for name, shape in entries:
            nbytes = size * math.prod(shape)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, tuple(shape)))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_bytes = offset
        self._f = open(self.part, "wb")
        self._f.write(len(raw).to_bytes(8, "little"))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, exp_shape = self._expected[self._next]
        if name != exp_name or tuple(tensor.shape) != exp_shape or tensor.dtype != self.dtype:
            raise RuntimeError(f"writer expected {exp_name} {exp_shape} {self.dtype}, got {name} {tuple(tensor.shape)} "
                               f"{tensor.dtype}")
        self._f.write(tensor.contiguous().view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise RuntimeError(f"only {self._next} of {len(self._expected)} tensors written")
        self._f.close()
        os.replace(self.part, self.path)

    def abort(self) -> None:
        self._f.close()
        try:
            os.unlink(self.part)
        except FileNotFoundError:
            pass


def model_files(model: str, layers, seed: int, subset: str, folder: Path, log,
                storage: str = "fp16") -> tuple[Path, Path, float]:
    """Source and target files for ``model`` in ``folder`` (made if absent); seconds spent making them."""
    spec = {"model": model, "layers": layers, "seed": seed, "version": GENERATOR_VERSION,
            "exp": SPECTRUM_EXPONENT, "rms": ENTRY_RMS, "ft": [FINE_TUNE_STRENGTH, FINE_TUNE_RANK,
                                                               FINE_TUNE_DENSE_FRACTION]}
    if storage != "fp16":
        spec["storage"] = storage
    spec = json.dumps(spec)
    tag = hashlib.sha256(spec.encode()).hexdigest()[:12]
    stem = f"{model}{'-' + subset if subset else ''}{'' if storage == 'fp16' else '-' + storage}-seed{seed}-{tag}"
    paths = (folder / f"{stem}-source.safetensors", folder / f"{stem}-target.safetensors")
    if all(p.exists() for p in paths):
        try:
            if all((check_safetensors_file(p).get("__metadata__") or {}).get("bench_spec") == tag for p in paths):
                log(f"  reusing {paths[0].name} and {paths[1].name}")
                return paths[0], paths[1], 0.0
        except Exception as e:  # noqa: BLE001 - a damaged file is simply made again
            log(f"  existing files unusable ({e}); making them again")
    elem = torch.empty((), dtype=STORAGE[storage][0]).element_size()
    need = 2 * sum(elem * math.prod(s) for _, s in layers)
    free = shutil.disk_usage(folder).free
    if free < need * 1.1 + (1 << 30):
        raise SystemExit(f"not enough free disk in {folder}: the {model} files need {need / 1e9:.1f} GB "
                         f"(+ SVD caches), {free / 1e9:.1f} GB free; use --cache-dir")
    log(f"  making {model} source and target ({need / 2e9:.2f} GB each, {storage}) in {folder} …")
    t0 = time.perf_counter()
    synth = Synth(seed)
    names = [(CHECKPOINT_PREFIX + key[len("diffusion_model."):], shape) for key, shape in layers]
    meta = {"bench_spec": tag, "bench": "bench/transfer.py synthetic " + model}
    dtype = STORAGE[storage][0]
    ws = StreamingSafetensorsWriter(paths[0], names, meta, storage)
    wt = StreamingSafetensorsWriter(paths[1], names, meta, storage)
    try:
        for (key, shape), (name, _) in zip(layers, names):
            Ws, Wt, _ = synth.layer(model, key, shape)
            ws.write(name, Ws.to(dtype).reshape(shape))
            wt.write(name, Wt.to(dtype).reshape(shape))
            del Ws, Wt
        ws.close()
        wt.close()
    except BaseException:
        ws.abort()
        wt.abort()
        raise
    return paths[0], paths[1], time.perf_counter() - t0


def make_adapter(model: str, layers, seed: int) -> dict[str, Delta]:
    """A random rank-32 LoRA on every layer, as factored deltas (up ~ 0.01·N(0,1), down ~ N(0,1/n))."""
    deltas = {}
    for key, shape in layers:
        m, n = _matrix_shape(shape)
        g = torch.Generator().manual_seed(_seed(seed, "lora", model, key))
        down = torch.randn(LORA_RANK, n, generator=g) / math.sqrt(n)
        up = torch.randn(m, LORA_RANK, generator=g) * 0.01
        deltas[key] = Delta.factored(shape, up, down)
    return deltas


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def engine_options(args) -> dict:
    """The SVDEngine options the command line overrides (none: the library's defaults)."""
    out = {}
    if args.memo_mb is not None:
        out["memory_bytes"] = int(args.memo_mb * (1 << 20))
    if args.workers is not None:
        out["workers"] = args.workers
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def io_read_bytes() -> int | None:
    """Bytes this process has read from storage (page-cache hits excluded); None where unknown."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def drop_from_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of this run's own files in ``folder`` (only
    those: the machine is shared), so the next read comes from the disk."""
    for path in folder.iterdir():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)  # pages not yet written back cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_page_cache(folder: Path) -> None:
    """Read every file of ``folder`` once, so the next run finds it in the page cache."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


def as_float32_cache(src: Path, dst: Path) -> None:
    """The cache in ``src`` rewritten as the float32 entries the cache kept before (module docstring)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.name.endswith(".log"):
            shutil.copy(path, dst / path.name)
            continue
        if not path.name.endswith(".svd.safetensors"):
            continue
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k).to(torch.float32) for k in ("U", "S", "V")}
        meta["dtype"] = "float32"
        save_file(tensors, str(dst / path.name), metadata=meta)


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Measure:
    seconds: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0
    cpu_seconds: float = 0.0
    load_end: float = 0.0
    vram_extra: int | None = None
    aborted: str = ""             # why the memory guard stopped the run ("" = it finished)
    io_read: int | None = None    # bytes this process read from storage during the run (/proc/self/io)

    @property
    def extra_rss(self) -> int:
        return self.rss_peak - self.rss_start


class measured:
    """Context manager: wall time, peak RSS sampled every ``interval`` s, CPU time, CUDA peak."""

    def __init__(self, device: torch.device, interval: float = 0.02, min_free_bytes: int = 0):
        self.device = device
        self.interval = interval
        self.min_free = min_free_bytes
        self.m = Measure()
        self._stop = threading.Event()

    def _sample(self):
        i = 0
        while not self._stop.wait(self.interval):
            self.m.rss_peak = max(self.m.rss_peak, rss_bytes())
            i += 1
            if self.min_free and i % 10 == 0 and not self.m.aborted:
                free = mem_available()
                if free is not None and free < self.min_free:
                    # The machine is shared: stop this run before the kernel's OOM killer picks a victim.
                    self.m.aborted = (f"memory guard: {free / 2**30:.1f} GiB available < {self.min_free / 2**30:.1f} "
                                      f"GiB with this process at {rss_bytes() / 2**30:.1f} GiB RSS")
                    _thread.interrupt_main()

    def __enter__(self) -> Measure:
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._vram0 = torch.cuda.memory_allocated()
        self.m.rss_start = self.m.rss_peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self._cpu0 = ru.ru_utime + ru.ru_stime
        self._io0 = io_read_bytes()
        self._t0 = time.perf_counter()
        return self.m

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.m.seconds = time.perf_counter() - self._t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.m.cpu_seconds = ru.ru_utime + ru.ru_stime - self._cpu0
        io = io_read_bytes()
        self.m.io_read = None if io is None or self._io0 is None else io - self._io0
        self._stop.set()
        self._thread.join()
        self.m.rss_peak = max(self.m.rss_peak, rss_bytes())
        self.m.load_end = os.getloadavg()[0]
        if self.device.type == "cuda":
            self.m.vram_extra = torch.cuda.max_memory_allocated() - self._vram0
        return False


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


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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
            t["read"] = _best(lambda: target.weight(key).clone(), r)  # mapped lazily: clone reads
            t["digest"] = _best(lambda: weight_digest(w.view(w.shape)), r)  # a new tensor: no memo hit
            t["upcast64"] = _best(lambda: weight_matrix(w, torch.float64), r)
            M = weight_matrix(w, torch.float64)
            A = M.mT if M.shape[0] > M.shape[1] else M
            t["gram64"] = _best(lambda: A @ A.mT, r)
            G = A @ A.mT
            t["eigh64"] = _best(lambda: torch.linalg.eigh(G), r)
            ev, vec = torch.linalg.eigh(G)
            U = vec[:, -k:].flip(-1).contiguous()
            S = ev[-k:].flip(-1).clamp_min(0).sqrt()
            t["V=AᵀU/σ"] = _best(lambda: (A.mT @ U) / S, r)
            V = (A.mT @ U) / S
            t["signs"] = _best(lambda: canonical_signs(U, V), r)
            f = SVDEngine("gram").rounded(SVDFactors(V, S, U) if M.shape[0] > M.shape[1] else SVDFactors(U, S, V))
            digest = weight_digest(w)
            t["cache put"] = _best(lambda: store.put(digest, "gram", f), r)
            t["cache get"] = _best(lambda: store.get(digest, "gram", k), r)
            f32 = store.get(digest, "gram", k)
            fs = SVDEngine("gram").factors(source.weight(key), k)
            t["Φ̂+project"] = _best(lambda: (layer_similarity(fs, f32, k), project_lorax(deltas[key], f32)), r)
            t["engine 1"] = _best(lambda: SVDEngine("gram").factors(w.view(w.shape), k), r)
            ws = [target.weight(kk) for kk in (ks * 8)[:8]]
            t["engine ×8/8"] = _best(lambda: SVDEngine("gram", batch_size=8).factors_many([(x, k) for x in ws]), r) / 8
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


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt_err(errors: list[float]) -> tuple[str, str]:
    if not errors:
        return "-", "-"
    return f"{max(errors):.2e}", f"{statistics.median(errors):.2e}"


def print_table(rows: list[Row], infos: list[dict], device: torch.device, args, rss0: int) -> None:
    cuda = device.type == "cuda"
    cols = ["model", "layers", "method", "cold s", "warm s", "×baseline", "peak extra RSS MB", "max rel err",
            "median rel err", "SVDs", "moved", "read GB", "cpu s", "×baseline cpu", "cpu%", "load"] + \
        (["extra VRAM MB"] if cuda else [])
    table = []
    base = {r.model: r.measure.seconds for r in rows if r.method == "naive svd32"}
    base_cpu = {r.model: r.measure.cpu_seconds for r in rows if r.method == "naive svd32"}
    cores = os.cpu_count() or 1
    for r in rows:
        b = base.get(r.model)
        mx, md = fmt_err(r.errors)
        cells = [r.model + subset_label(r.model, args), str(r.layers),
                 r.method + (" ABORTED" if r.measure.aborted else ""),
                 "" if r.warm else f"{r.measure.seconds:.1f}", f"{r.measure.seconds:.1f}" if r.warm else "",
                 f"{b / r.measure.seconds:.2f}" if b and not r.method.startswith("read") else "-",
                 f"{r.measure.extra_rss / 2**20:.0f}", mx, md,
                 "-" if r.svds is None else str(r.svds), "-" if r.moved is None else f"{r.moved}/{r.layers}",
                 "-" if r.cache_read is None or not r.warm else
                 f"{r.cache_read / 1e9:.2f}/{'?' if r.measure.io_read is None else f'{r.measure.io_read / 1e9:.2f}'}",
                 f"{r.measure.cpu_seconds:.1f}",
                 f"{base_cpu[r.model] / r.measure.cpu_seconds:.2f}"
                 if r.model in base_cpu and not r.method.startswith("read") and r.measure.cpu_seconds > 0 else "-",
                 f"{100 * r.measure.cpu_seconds / max(1e-9, r.measure.seconds * cores):.0f}",
                 f"{r.measure.load_end:.1f}"]
        if cuda:
            cells.append("-" if r.measure.vram_extra is None else f"{r.measure.vram_extra / 2**20:.0f}")
        table.append(cells)
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    line = " | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    print("\n" + line)
    print("-+-".join("-" * w for w in widths))
    for t in table:
        print(" | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths))))
    cpu = _cpu_model()
    print(f"\nmachine: {cpu}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, "
          f"Python {platform.python_version()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"load average {args.load_start:.1f} at start")
    print(f"code: {_git_state()}")
    print("process baseline RSS (before the runs, adapter and reference held): " +
          ", ".join(f"{i['model']} {i['rss_before_runs'] / 2**20:.0f} MB" for i in infos) +
          f" (at start {rss0 / 2**20:.0f} MB)")
    print(f"settings: TransferSettings defaults (k = 320 capped at half the layer rank, Φ̂ ≥ 0.3) with mode lorax, "
          f"LoRA rank {LORA_RANK}, engine defaults"
          f"{''.join(f' but {k}={v}' for k, v in engine_options(args).items())}, SVD cache limit "
          f"{'library default 16 GiB' if args.cache_gb is None else f'{args.cache_gb:g} GiB'}, seed {args.seed}")
    for info in infos:
        floor = info.get("floor") or []
        if floor:
            fl = ", ".join(f"{s[0]}×{s[1]}{'×1×1' if len(s) == 4 else ''}: {e:.1e}" for s, e, _ in floor)
            print(f"{info['model']}: files {info['file_gb']:.2f} GB each; error sample {len(info['ref_keys'])} "
                  f"layers ({info['ref_per_shape']} per shape class); {args.dtype} storage floor (projected delta, "
                  f"analytic vs stored source basis): {fl}")
        elif not info["ref_keys"]:
            print(f"{info['model']}: files {info['file_gb']:.2f} GB each ({args.dtype}); no float64 reference sample "
                  f"(--ref-per-shape 0): the error columns are empty")
    for r in rows:
        if r.note:
            print(f"  {r.model} {r.method}: {r.note}")
    for info in infos:
        if info["model"] == "flux":
            print_flux_extrapolation([r for r in rows if r.model == "flux"], info, args)
    print("\ntargets" + (" (CPU targets; informational on cuda)" if cuda else " (CPU)") + ":")
    for model in dict.fromkeys(r.model for r in rows):
        mr = {r.method: r for r in rows if r.model == model}
        b = base.get(model)
        quick = f" [subset{subset_label(model, args)}]" if subset_label(model, args) else ""
        for r in mr.values():
            if r.measure.aborted:
                print(f"  {model}{quick}: {r.method} did not finish ({r.measure.aborted}): MISS")
        for method in ("gram cold", "randomized cold"):
            r = mr.get(method)
            if r is None or not b or r.measure.aborted:
                continue
            speed = b / r.measure.seconds
            err = max(r.errors) if r.errors else float("nan")
            ok = speed >= TARGET_SPEEDUP and err <= TARGET_ERROR
            print(f"  {model}{quick}: {method} {speed:.2f}× faster than naive svd32 (≥ {TARGET_SPEEDUP:g}×) "
                  f"at max rel err {err:.1e} (≤ {TARGET_ERROR:g}): {'PASS' if ok else 'MISS'}")
        for label in ("gram warm (disk)", "gram warm (page cache)", "gram warm prolora (page cache)"):
            w = mr.get(label)
            if w is None:
                continue
            print(f"  {model}{quick}: {label} decomposed {w.svds} layers (must be 0): "
                  f"{'PASS' if w.svds == 0 else 'MISS'}")
            if model == "sdxl":
                print(f"  {model}{quick}: {label} {w.measure.seconds:.1f} s (≤ {TARGET_WARM_SDXL_S:g} s): "
                      f"{'PASS' if w.measure.seconds <= TARGET_WARM_SDXL_S else 'MISS'}")
        old, new = mr.get("gram warm f32 (disk)"), mr.get("gram warm (disk)")
        if old is not None and new is not None:
            # U and V are exactly half; σ (k float32 numbers) and the ~300-byte header of each entry are
            # not, which puts the ratio a few 1e-4 above 0.5 (the reported figure has four decimals).
            ratio = new.cache_bytes / max(1, old.cache_bytes)
            print(f"  {model}{quick}: cache {new.cache_bytes / 1e9:.3f} GB float16 vs {old.cache_bytes / 1e9:.3f} GB "
                  f"float32 before ({ratio:.4f}×, ≤ 0.5× but for σ and headers, i.e. ≤ 0.501×): "
                  f"{'PASS' if ratio <= 0.501 else 'MISS'}")
            for where in ("disk", "page cache"):
                o, n = mr.get(f"gram warm f32 ({where})"), mr.get(f"gram warm ({where})")
                if o is not None and n is not None:
                    print(f"  {model}{quick}: warm from the {where}: float32 entries {o.measure.seconds:.1f} s reading "
                          f"{o.cache_read / 1e9:.2f} GB; float16 entries {n.measure.seconds:.1f} s reading "
                          f"{n.cache_read / 1e9:.2f} GB (storage reads {_gb(o.measure.io_read)} → "
                          f"{_gb(n.measure.io_read)} GB)")
        for method in ("gram cold", "gram warm (page cache)", "randomized cold"):
            r = mr.get(method)
            if r is not None:
                mb = r.measure.extra_rss / 2**20
                print(f"  {model}{quick}: {method} peak extra RSS {mb:.0f} MB (≤ {TARGET_EXTRA_RSS_MB:.0f} MB): "
                      f"{'PASS' if mb <= TARGET_EXTRA_RSS_MB else 'MISS'}")


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f}"


def flux_cache_bytes(layers, settings: TransferSettings) -> int:
    """What the SVD cache holds for these layers of both models: float16 U (m×k) and V (n×k), float32 σ."""
    total = 0
    for _, shape in layers:
        m, n = _matrix_shape(shape)
        total += 2 * (2 * (m + n) + 4) * settings.rank_for(shape)
    return total


def print_flux_extrapolation(rows: list[Row], info: dict, args) -> None:
    """Full Flux.1 from the block subset, per layer class (module docstring)."""
    d, s = args.flux_blocks
    scale = {"double_blocks": FLUX_BLOCKS[0] / d, "single_blocks": FLUX_BLOCKS[1] / s}
    full = flux_layers(*FLUX_BLOCKS)
    settings = BENCH_SETTINGS
    print(f"\nflux extrapolated to Flux.1 ({FLUX_BLOCKS[0]} double + {FLUX_BLOCKS[1]} single blocks, {len(full)} layers, "
          f"{sum(math.prod(x) for _, x in full) / 1e9:.1f} B parameters) from the {d}+{s}-block subset "
          f"({info['layers']} layers), per block kind: time × {scale['double_blocks']:g} (double) and × "
          f"{scale['single_blocks']:g} (single):")
    for r in rows:
        if not r.part_seconds or r.measure.aborted:
            continue
        total = sum(scale[k] * v for k, v in r.part_seconds.items())
        parts = " + ".join(f"{scale[k]:g} × {v:.1f} s" for k, v in r.part_seconds.items())
        print(f"  {r.method}: {parts} = {total:.0f} s ({total / 60:.1f} min); peak extra RSS stays at the "
              f"subset's {r.measure.extra_rss / 2**20:.0f} MB (bounded per layer, not per model)")
    subset_cache = flux_cache_bytes(flux_layers(d, s), settings)
    measured_cache = max((r.cache_bytes for r in rows if r.cache_bytes), default=0)
    print(f"  SVD cache for a LoRA on every layer: {subset_cache / 1e9:.2f} GB computed for the subset "
          f"(measured {measured_cache / 1e9:.2f} GB on disk), {flux_cache_bytes(full, settings) / 1e9:.1f} GB for the "
          f"full model: a warm run of such a LoRA needs LORAX_SVD_CACHE_GB of at least that (default 16).")


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %ad", "--date=iso"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "lorax"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"commit {head or '?'}" + (", lorax/ has uncommitted changes" if dirty else ", lorax/ clean")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
