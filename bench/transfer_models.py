"""``bench/transfer.py``'s models: the layer lists of SD1.5, SDXL and Flux (derived from ComfyUI's
model detection) and the synthetic weights, files and adapter built on them (module docstring of
``bench/transfer.py``: the construction)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from lorax.delta import Delta  # noqa: E402
from lorax.safetensors_io import check_safetensors_file  # noqa: E402
from lorax.transfer import TransferSettings  # noqa: E402


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


def seed_of(*parts) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def matrix_shape(shape) -> tuple[int, int]:
    return int(shape[0]), int(math.prod(shape[1:]))


class Synth:
    """Deterministic source/target weights with an exactly known source SVD (module docstring)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._bases: dict[tuple[int, int], tuple] = {}

    def basis(self, m: int, n: int):
        """``(U₀, σ, V₀, W₀)`` for one matrix shape; U₀, σ, V₀ float64, W₀ float32."""
        if (m, n) not in self._bases:
            g = torch.Generator().manual_seed(seed_of(self.seed, "basis", m, n))
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
        m, n = matrix_shape(shape)
        U0, S, V0, W0 = self.basis(m, n)
        g = torch.Generator().manual_seed(seed_of(self.seed, "layer", model, key))
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
        m, n = matrix_shape(shape)
        g = torch.Generator().manual_seed(seed_of(seed, "lora", model, key))
        down = torch.randn(LORA_RANK, n, generator=g) / math.sqrt(n)
        up = torch.randn(m, LORA_RANK, generator=g) * 0.01
        deltas[key] = Delta.factored(shape, up, down)
    return deltas
