#!/usr/bin/env python3
"""Fidelity on trained models: diffusion models trained here on real images, judged on the images they draw.

``bench/fidelity.py`` measures transfers on random weights with planted spectra; nothing there was
trained the way checkpoints are, and nothing looks at images. Here every model is trained, on real
images, through ComfyUI itself (the in-process host of ``tests/host.py``), and every arm is judged on
images sampled with ComfyUI's KSampler.

Data: scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 8×8 grey
images of 10 classes, shipped in the scikit-learn wheel), scaled to [-1, 1]; a fixed train/held-out
split (the held-out images train nothing).

Models (per seed; ComfyUI's own ``UNetModel`` at a reduced width, in a ``ModelPatcher``)
-----------------------------------------------------------------------------------------
A model configuration of ComfyUI's SD15 family (``DigitsUNet``: ``comfy.supported_models.SD15`` with
a one-channel latent format of scale 1 and head width 16) with model_channels 32, channel_mult (1, 2)
(widths 32 and 64), two res blocks with a transformer block each per level, context 64. The class
reaches the model only through cross-attention: a frozen "text encoder" (a fixed random 4 × 64
embedding per class, the same for every model). Training runs through the pack's
``train_weight_wrappers`` (ComfyUI's ``TrainSampler`` + ``Guider_Basic``, the loop LoRA-X Train uses)
with one trainable full-weight wrapper per tensor, the stock loss (x0), Adam.

* **base**: from a fresh init on the digits.
* **fine-tune**: the base trained further on *thicker strokes* (each image max-ed with itself shifted
  one pixel right), ``ft_steps`` steps.
* **far**: the base trained further, ``far_steps`` steps at a higher learning rate, on *slanted and
  thick* digits (rows sheared by up to ±1 px, then thickened).
* **distilled**: a student with one res block + transformer per level instead of two (BK-SDM's cut:
  one block pair per stage removed, output stages 3 → 2), initialised from the base's kept blocks,
  then trained only to reproduce the base's predictions (the LoRA-X Train node's teacher path:
  output-level distillation, loss on the predicted noise).

* **ssd** (since 0.3.1): a student in SSD-1B's manner. The base's second-level attention stacks hold two
  transformer blocks (``DEPTH``; SDXL stacks 2 and 10 on its lower levels); the student keeps every block
  but cuts those stacks to one, the teacher's *second*, which the student calls ``transformer_blocks.0``:
  by name the stock loader puts the teacher's block-0 deltas on it and has no place for the block-1 ones.
  Distilled from the base as the BK-SDM student is. ``paired as built`` in the report counts the layers the
  similarity map pairs with the base layer they were initialised from.

Since 0.3.1 the base is trained ``base_steps`` and then ``base_polish_steps`` at a lower rate (its samples
read at 0.97 / 0.96 on seeds 0 / 1 against 0.88 at 400 steps, measured on the depth-1 model), ``--jobs``
runs seeds in parallel processes, and arms whose transfer patches the same deltas as an earlier arm of
the same adapter (``auto`` copying every layer is ``copy``; LoRA-X's ``prolora`` is ``lorax``) are judged
once. The quick variant keeps depth 1 and one style.

Adapters: the style no model has is *low contrast on a grey background* (x ↦ 0.75x + 0.25), learnt from
styled base-domain training images with their classes. LoRA-X (LoRA-X Train, Δσ of the top r
singular values, r = 16: the shipped 320 scaled with the width, so r is half the rank of 32-wide
layers and a quarter of 64-wide ones, as 320 is of SD1.5's 640- and SDXL's 1280-wide layers) and an ordinary rank-4 LoRA
(the host's ``LoRAAdapter.create_train`` through the same loop), on the attention projections
(to_q/k/v/out of every transformer block), trained on the base and, as ground truth, on each target.
A second style (since 0.3.1), a texture rather than a global map: *stripes* (every other row's strokes
dimmed to 30 %), with its own probe; its adapters are labelled ``LoRA-X/stripes`` and ``LoRA/stripes``.

Arms per target: none; LoRA-X / LoRA trained on the target (GT); trained on the base and moved with
the LoRA-X Transfer node's code (``run_transfer``, layer map by similarity, threshold 0.3, k = 16) in
every mode of the pack (``auto``, the default: copy where the weight moved ≤ 50 %, transport the rest;
``copy`` along the layer map; ``transport``; ``prolora_cross``; ``prolora``; ``lorax``), the copy with a
per-layer strength correction (each delta × ‖W_t‖/‖W_s‖), and copied by name the way the stock loader
applies it. A Φ̂-threshold sweep (mode ``lorax``) and a sweep of auto's bound re-judge an arm only where
another value moves (or copies) another set of layers.

Judges (trained here on the training images of every domain, plain and styled; never on held-out ones):
a digit classifier (scikit-learn MLP on the 64 pixels) — **class accuracy** of the samples against
the class they were drawn for; a style probe (logistic regression, styled or not) — **style** =
mean probability that a sample is styled; **kept** = (style_arm − style_none)/(style_GT − style_none),
the share of the ground truth's style gain an arm keeps (per adapter kind). Plus the output distances of
``bench/fidelity.py`` on held-out noisy inputs: cosine of the arm's output change against its GT's.

Usage::

    .venv/bin/python bench/trained_fidelity.py            # 3 seeds, all targets (1592 s here, load 2.3-3)
    .venv/bin/python bench/trained_fidelity.py --quick    # one seed, base + fine-tune (139 s; the test runs it)
    .venv/bin/python bench/trained_fidelity.py --json out.json --grid docs/images/trained_fidelity_grid.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
for _p in (REPO_ROOT / "tests", REPO_ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
if str(REPO_ROOT / "bench") not in sys.path:  # measure.py, when the tests load this file by path
    sys.path.append(str(REPO_ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import host  # noqa: E402  (the tests' in-process ComfyUI host)
from measure import load_average  # noqa: E402
from lorax.training import FAMILIES, select_layers  # noqa: E402
from lorax.transfer import DEFAULT_COPY_BELOW, DEFAULT_RANK, DEFAULT_THRESHOLD, TransferSettings  # noqa: E402

TARGETS = ("finetune", "far", "distilled", "ssd")
#: The pack's transfer modes an arm moves an adapter with (lorax.transfer.MODES); ``copy`` copies along the
#: layer map, while the "copied" arms copy by name, as the stock loader does.
BENCH_MODES = ("auto", "copy", "transport", "prolora_cross", "prolora", "lorax")
KINDS = ("LoRA-X", "LoRA")
#: The styles adapters are trained for: ``grey`` is a global intensity map, ``stripes`` a texture on the strokes.
STYLE_NAMES = ("grey", "stripes")


def adapter_label(kind: str, style_name: str) -> str:
    """``LoRA-X`` / ``LoRA`` for the first style (the figures of earlier runs), ``LoRA/stripes`` etc. for others."""
    return kind if style_name == STYLE_NAMES[0] else f"{kind}/{style_name}"


def adapters_of(styles=STYLE_NAMES) -> list[tuple[str, str, str]]:
    """(kind, style, label) of every adapter a run trains."""
    return [(kind, st, adapter_label(kind, st)) for st in styles for kind in KINDS]


def arms_of(modes=BENCH_MODES, scaled: bool = False, styles=STYLE_NAMES[:1]) -> tuple[str, ...]:
    """Every arm of a run: none, then per adapter its GT, each mode, the strength-corrected copy, copied."""
    out = ["none"]
    for _, _, label in adapters_of(styles):
        out += [f"{label} GT", *(f"{label} → {m}" for m in modes)]
        out += [f"{label} → copy ×‖W‖"] if scaled else []
        out.append(f"{label} copied")
    return tuple(out)


def adapter_of(arm: str) -> str:
    return arm.split(" ", 1)[0]


def gt_of(arm: str) -> str:
    return f"{adapter_of(arm)} GT"


def style_of(arm: str) -> str:
    label = adapter_of(arm)
    return label.split("/", 1)[1] if "/" in label else STYLE_NAMES[0]


WIDTH = 32
#: Transformer blocks per attention stack on the second (64-wide) level, as SDXL stacks 2 and 10 on its lower
#: levels: the SSD-1B-style student keeps one of them.
DEPTH = 2


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    targets: tuple[str, ...] = TARGETS
    batch_size: int = 32
    base_steps: int = 600
    base_lr: float = 2e-3
    base_polish_steps: int = 200              # then at a lower rate: base samples read at >= 0.95, not 0.88
    base_polish_lr: float = 4e-4
    ft_steps: int = 100
    ft_lr: float = 1e-3
    far_steps: int = 250
    far_lr: float = 2e-3
    distill_steps: int = 250
    distill_lr: float = 2e-3
    adapter_steps: int = 80
    lorax_lr: float = 0.1
    lora_lr: float = 0.02
    rank: int = DEFAULT_RANK * WIDTH // 640   # k (and LoRA-X r) a quarter of the widest layers, as 320 is of 1280
    lora_rank: int = 4
    threshold: float = DEFAULT_THRESHOLD
    per_class: int = 10                       # samples per class and arm
    sample_steps: int = 16
    n_eval: int = 64                          # held-out noisy inputs for the output distances
    sweep_thresholds: tuple[float, ...] = ()  # Φ̂ thresholds tried besides the shipped one (needs "lorax" in modes)
    modes: tuple[str, ...] = BENCH_MODES      # the pack's modes judged as arms
    scaled: bool = False                      # the strength-corrected copy arm (0.3.0's run: no measurable change)
    copy_below: tuple[float, ...] = ()        # auto's bound tried besides the shipped one (0.3.0's run: 0.1, 0.25)
    styles: tuple[str, ...] = STYLE_NAMES     # the adapters' styles
    depth: int = DEPTH                        # transformer blocks per second-level stack (the ssd target needs 2)

    @property
    def arms(self) -> tuple[str, ...]:
        return arms_of(self.modes, self.scaled, self.styles)


QUICK = Config(seeds=(0,), targets=("finetune",), base_steps=300, base_polish_steps=0, ft_steps=30,
               adapter_steps=30, per_class=5, sample_steps=12, n_eval=32, sweep_thresholds=(),
               modes=("auto", "prolora"), scaled=False, copy_below=(), styles=("grey",), depth=1)


# --------------------------------------------------------------------------------------
# Data: the digits, their domains, the style
# --------------------------------------------------------------------------------------


def thick(x: torch.Tensor) -> torch.Tensor:
    """Bolder strokes: each image max-ed with itself shifted one pixel right (images in [-1, 1])."""
    shifted = torch.nn.functional.pad(x[..., :, :-1], (1, 0), value=-1.0)
    return torch.maximum(x, shifted)


def slant(x: torch.Tensor) -> torch.Tensor:
    """Italic: row i shifted right by round((3.5 − i)·0.3) pixels (top right, bottom left)."""
    out = torch.full_like(x, -1.0)
    h = x.shape[-2]
    for i in range(h):
        s = int(round((h / 2 - 0.5 - i) * 0.3))
        if s > 0:
            out[..., i, s:] = x[..., i, :-s]
        elif s < 0:
            out[..., i, :s] = x[..., i, -s:]
        else:
            out[..., i, :] = x[..., i, :]
    return out


DOMAINS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "base": lambda x: x, "finetune": thick, "far": lambda x: thick(slant(x))}
TARGET_DOMAIN = {"base": "base", "finetune": "finetune", "far": "far", "distilled": "base", "ssd": "base"}


def style(x: torch.Tensor) -> torch.Tensor:
    """The adapters' style: low contrast on a grey background (background −1 → −0.5, strokes kept at +1).

    Inverting the digits (bright background) was tried first: 60 adapter steps gave style 0.7–0.9 but
    samples no classifier could read (class accuracy ≈ chance), for LoRA-X and LoRA alike, so no arm could
    be compared on content."""
    return 0.75 * x + 0.25


def stripes(x: torch.Tensor) -> torch.Tensor:
    """The second style, a texture rather than a global map: on every other row the strokes are dimmed to 30 %
    of their height over the background (the background and the even rows are untouched)."""
    out = x.clone()
    out[..., 1::2, :] = -1.0 + 0.3 * (x[..., 1::2, :] + 1.0)
    return out


STYLES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"grey": style, "stripes": stripes}


@dataclass
class Data:
    train_x: torch.Tensor   # [n, 1, 8, 8] in [-1, 1]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_data(n_test: int = 360) -> Data:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    test, train = perm[:n_test], perm[n_test:]
    return Data(x[train], y[train], x[test], y[test])


class ClassEncoder:
    """The frozen "text encoder": a fixed random 4-token × 64 embedding per class, shared by all models."""

    def __init__(self, tokens: int = 4, dim: int = 64):
        g = torch.Generator().manual_seed(4321)
        self.table = torch.randn(10, tokens, dim, generator=g)

    def per_latent(self, y: torch.Tensor) -> list:
        return [[self.table[int(c)][None].clone(), {}] for c in y]

    def batched(self, y: torch.Tensor) -> list:
        return [[self.table[y].clone(), {}]]


# --------------------------------------------------------------------------------------
# Judges: a digit classifier and a style probe, trained here on the training images
# --------------------------------------------------------------------------------------


class Judges:
    def __init__(self, data: Data, seed: int = 0, styles: tuple[str, ...] = STYLE_NAMES):
        self.styles = tuple(styles)
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier

        flat = lambda x: x.reshape(len(x), -1).numpy()  # noqa: E731
        plain = [fn(data.train_x) for fn in DOMAINS.values()]
        xs = [*plain, *(STYLES[st](x) for st in self.styles for x in plain)]
        self.classifier = MLPClassifier(hidden_layer_sizes=(128,), max_iter=300, random_state=seed).fit(
            flat(torch.cat(xs)), data.train_y.repeat(len(xs)).numpy())
        self.probes = {}  # one per style: plain or styled, every domain
        for st in self.styles:
            x = torch.cat([*plain, *(STYLES[st](p) for p in plain)])
            s = torch.cat([torch.zeros(len(x) // 2), torch.ones(len(x) // 2)]).long()
            self.probes[st] = LogisticRegression(max_iter=1000).fit(flat(x), s.numpy())
        self.held_out: dict[str, float] = {}
        for name, fn in DOMAINS.items():
            for st in ("", *self.styles):
                x = fn(data.test_x)
                self.held_out[f"{name} {st}".strip()] = self.accuracy(STYLES[st](x) if st else x, data.test_y)
        xt = torch.cat([fn(data.test_x) for fn in DOMAINS.values()])
        self.probe_accuracy = {st: 0.5 * (self.style_score(STYLES[st](xt), st) + 1 - self.style_score(xt, st))
                               for st in self.styles}
        self.probe_held_out = min(self.probe_accuracy.values())

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(self.classifier.score(x.clamp(-1, 1).reshape(len(x), -1).numpy(), y.numpy()))

    def style_score(self, x: torch.Tensor, style_name: str = STYLE_NAMES[0]) -> float:
        """Mean P(styled) by that style's probe."""
        probe = self.probes[style_name]
        return float(probe.predict_proba(x.clamp(-1, 1).reshape(len(x), -1).numpy())[:, 1].mean())


# --------------------------------------------------------------------------------------
# Models: ComfyUI's UNet at a reduced width, in ModelPatchers
# --------------------------------------------------------------------------------------


_CLASSES: dict[str, type] = {}


def _model_classes():
    """The latent format and the model configuration (made once, after the host has been booted)."""
    if not _CLASSES:
        import comfy.latent_formats
        import comfy.supported_models

        class DigitsLatent(comfy.latent_formats.LatentFormat):
            latent_channels = 1
            scale_factor = 1.0

        class DigitsUNet(comfy.supported_models.SD15):
            """SD1.5's model family at width 32 on one-channel 8×8 'latents' (the digits themselves)."""
            unet_extra_config = {"num_heads": -1, "num_head_channels": 16}
            latent_format = DigitsLatent

        _CLASSES.update(latent=DigitsLatent, config=DigitsUNet)
    return _CLASSES


def unet_config(res_blocks: int, depth: int = DEPTH) -> dict:
    """ComfyUI's UNet config: ``depth`` transformer blocks per stack on the second level (input stacks are
    taken in order, output stacks from the end: SDXL's lists read the same way)."""
    return {"use_checkpoint": False, "image_size": 8, "use_spatial_transformer": True, "legacy": False,
            "adm_in_channels": None, "in_channels": 1, "out_channels": 1, "model_channels": WIDTH,
            "num_res_blocks": [res_blocks] * 2, "transformer_depth": [1] * res_blocks + [depth] * res_blocks,
            "transformer_depth_output": [1] * (res_blocks + 1) + [depth] * (res_blocks + 1), "channel_mult": [1, 2],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 64,
            "use_temporal_resblock": False, "use_temporal_attention": False}


def _sdpa(func, *args, **kwargs):
    """PyTorch's attention for every attention call (ComfyUI's --use-pytorch-cross-attention, per model):
    the CPU default, sub-quadratic attention, cannot be differentiated once it chunks."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def make_model(sd: dict | None, res_blocks: int = 2, depth: int = DEPTH):
    """A ModelPatcher on the CPU over ComfyUI's BaseModel/UNetModel, loaded as comfy.sd loads a UNet."""
    import comfy.model_patcher

    config = _model_classes()["config"](unet_config(res_blocks, depth))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    if sd is not None:
        model.load_model_weights(dict(sd), "")
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    patcher.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = _sdpa
    return patcher


def init_weights(res_blocks: int, seed: int, depth: int = DEPTH) -> dict:
    """PyTorch's default init (U(±1/√fan_in)), norms 1/0, biases 0, and ldm's zero-initialised output layers."""
    shapes = {k: v.shape for k, v in make_model(None, res_blocks, depth).model.diffusion_model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("weight") and len(shape) >= 2:
            if k.startswith("out.2.") or ".out_layers.3." in k or ".proj_out." in k:
                out[k] = torch.zeros(shape)
            else:
                out[k] = (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(math.prod(shape[1:]))
        elif k.endswith("weight") and ("norm" in k or k.startswith("out.0") or "layers.0" in k):
            out[k] = torch.ones(shape)
        else:
            out[k] = torch.zeros(shape)
    return out


def weights(patcher) -> dict:
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def student_key_map() -> dict[str, str]:
    """Student block → teacher block (BK-SDM's cut: the first block pair of each input stage is kept, the
    output stages keep their first and last block)."""
    return {"input_blocks.0.": "input_blocks.0.", "input_blocks.1.": "input_blocks.1.",
            "input_blocks.2.": "input_blocks.3.", "input_blocks.3.": "input_blocks.4.",
            "output_blocks.0.": "output_blocks.0.", "output_blocks.1.": "output_blocks.2.",
            "output_blocks.2.": "output_blocks.3.", "output_blocks.3.": "output_blocks.5."}


def student_init(teacher_sd: dict, seed: int, depth: int = DEPTH) -> tuple[dict, int, int]:
    """The student's initial weights: the teacher's where a kept block has the same shape; fresh otherwise."""
    fresh = init_weights(1, seed, depth)
    blocks = student_key_map()
    out, copied = {}, 0
    for k, w in fresh.items():
        src = k
        for s, t in blocks.items():
            if k.startswith(s):
                src = t + k[len(s):]
                break
        tw = teacher_sd.get(src)
        if tw is not None and tw.shape == w.shape:
            out[k], copied = tw.clone(), copied + 1
        else:
            out[k] = w
    return out, copied, len(fresh)


#: The second-level stacks of the base (input_blocks 4, 5; output_blocks 0-2), each ``DEPTH`` blocks deep.
_LEVEL2_STACK = re.compile(r"^((?:input_blocks\.[45]|output_blocks\.[012])\.1\.transformer_blocks\.)0\.")


def ssd_init(teacher_sd: dict, seed: int) -> tuple[dict, int, int]:
    """The SSD-1B-style student: every block kept, the second level's stacks cut from two transformer blocks to
    one, and the one kept is the teacher's *second* (so it is named ``transformer_blocks.0`` in the student:
    by name, the stock loader puts the teacher's block-0 deltas on it and has no place for the block-1 ones)."""
    fresh = init_weights(2, seed, depth=1)
    out, copied = {}, 0
    for k, w in fresh.items():
        src = _LEVEL2_STACK.sub(lambda m: m.group(1) + f"{DEPTH - 1}.", k)
        tw = teacher_sd.get(src)
        if tw is not None and tw.shape == w.shape:
            out[k], copied = tw.clone(), copied + 1
        else:
            out[k] = w
    return out, copied, len(fresh)


def built_from(target: str, key: str) -> str:
    """The base layer a target's layer was initialised from (its own name on the fine-tunes): what a right
    layer map pairs it with."""
    prefix = "diffusion_model."
    inner = key[len(prefix):] if key.startswith(prefix) else key
    if target == "ssd":
        inner = _LEVEL2_STACK.sub(lambda m: m.group(1) + f"{DEPTH - 1}.", inner)
    elif target == "distilled":
        for s, t in student_key_map().items():
            if inner.startswith(s):
                inner = t + inner[len(s):]
                break
    return (prefix if key.startswith(prefix) else "") + inner


class FullWeight(torch.nn.Module):
    """A trainable copy of one tensor: the weight wrapper of full training (the model computes with it)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(w.detach().clone().float())

    def forward(self, w):
        return self.weight.to(w.dtype)


# --------------------------------------------------------------------------------------
# The lab: one seed's models, adapters, samples
# --------------------------------------------------------------------------------------


class Lab:
    def __init__(self, comfy_host, seed: int, cfg: Config, data: Data, encoder: ClassEncoder, judges: Judges,
                 log: Callable[[str], None] = print):
        pack = comfy_host.pack_module(host.REPO_ROOT)
        self.host, self.seed, self.cfg, self.data, self.enc, self.judges = comfy_host, seed, cfg, data, encoder, judges
        self.train_node, self.transfer_job = pack.nodes.train_node, pack.nodes.transfer_job
        self.bridge, self.handles = pack.nodes.bridge, pack.nodes.handles
        self.engine = pack.nodes.runtime.get_engine()
        self.log = log
        self.models: dict[str, Any] = {}
        self.losses: dict[str, list[float]] = {}
        self.seconds: dict[str, float] = {}
        g = torch.Generator().manual_seed(seed * 7_919 + 17)
        idx = torch.randperm(len(data.test_y), generator=g)[:cfg.n_eval]
        sampling = make_model(None).model.model_sampling
        sigma = torch.stack([sampling.percent_to_sigma((i + 0.5) / cfg.n_eval) * torch.ones(())
                             for i in range(cfg.n_eval)]).float()
        noise = torch.randn(cfg.n_eval, 1, 8, 8, generator=g)
        self.eval_xt = sampling.noise_scaling(sigma, noise, data.test_x[idx], False).float()
        self.eval_sigma, self.eval_ctx = sigma, encoder.table[data.test_y[idx]]
        self.eps_none: dict[str, torch.Tensor] = {}

    def _timed(self, label: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        self.seconds[label] = round(time.perf_counter() - t0, 1)
        return out

    # -- full training through the host's loop ------------------------------------------------------
    def train_full(self, model, x, y, *, steps, lr, seed, teacher=None):
        def build():
            mods = {"diffusion_model." + k: FullWeight(v) for k, v in
                    model.model.diffusion_model.state_dict().items()}
            return mods, [m.weight for m in mods.values()], mods

        mods, losses = self.train_node.train_weight_wrappers(
            model, build, {"samples": x}, self.enc.per_latent(y), batch_size=self.cfg.batch_size, steps=steps,
            learning_rate=lr, seed=seed, dtype=torch.float32, gradient_checkpointing=False, teacher=teacher,
            merge_conds=True)
        self.host.unload_all()
        return {k[len("diffusion_model."):]: m.weight.detach().clone() for k, m in mods.items()}, losses

    def build_models(self) -> None:
        cfg, d, s = self.cfg, self.data, self.seed * 100
        if "ssd" in cfg.targets and cfg.depth != DEPTH:
            raise ValueError(f"the ssd target cuts stacks of {DEPTH} transformer blocks; this run has depth {cfg.depth}")
        base = make_model(init_weights(2, self.seed, cfg.depth), depth=cfg.depth)
        sd, self.losses["base"] = self._timed("base", self.train_full, base, d.train_x, d.train_y,
                                              steps=cfg.base_steps, lr=cfg.base_lr, seed=s + 1)
        if cfg.base_polish_steps:
            sd, polish = self._timed("base polish", self.train_full, make_model(sd, depth=cfg.depth), d.train_x, d.train_y,
                                     steps=cfg.base_polish_steps, lr=cfg.base_polish_lr, seed=s + 5)
            self.losses["base"] = self.losses["base"] + polish
        self.models["base"] = make_model(sd, depth=cfg.depth)
        base_sd = sd
        if "finetune" in cfg.targets:
            sd, self.losses["finetune"] = self._timed(
                "finetune", self.train_full, self.models["base"], thick(d.train_x), d.train_y,
                steps=cfg.ft_steps, lr=cfg.ft_lr, seed=s + 2)
            self.models["finetune"] = make_model(sd, depth=cfg.depth)
        if "far" in cfg.targets:
            sd, self.losses["far"] = self._timed(
                "far", self.train_full, self.models["base"], DOMAINS["far"](d.train_x), d.train_y,
                steps=cfg.far_steps, lr=cfg.far_lr, seed=s + 3)
            self.models["far"] = make_model(sd, depth=cfg.depth)
        if "distilled" in cfg.targets:
            init, copied, total = student_init(base_sd, self.seed + 50, cfg.depth)
            self.student_copied = (copied, total)
            student = make_model(init, res_blocks=1, depth=cfg.depth)
            sd, self.losses["distilled"] = self._timed(
                "distilled", self.train_full, student, d.train_x, d.train_y, steps=cfg.distill_steps,
                lr=cfg.distill_lr, seed=s + 4, teacher=self.models["base"])
            self.models["distilled"] = make_model(sd, res_blocks=1, depth=cfg.depth)
        if "ssd" in cfg.targets:
            init, copied, total = ssd_init(base_sd, self.seed + 60)
            self.ssd_copied = (copied, total)
            sd, self.losses["ssd"] = self._timed(
                "ssd", self.train_full, make_model(init, depth=1), d.train_x, d.train_y, steps=cfg.distill_steps,
                lr=cfg.distill_lr, seed=s + 6, teacher=self.models["base"])
            self.models["ssd"] = make_model(sd, depth=1)

    # -- adapters --------------------------------------------------------------------------------------
    def style_set(self, style_name: str):
        return STYLES[style_name](self.data.train_x), self.data.train_y

    def train_lorax(self, name: str, seed: int, style_name: str = STYLE_NAMES[0]):
        x, y = self.style_set(style_name)
        cfg = self.cfg
        _, handle, losses, _ = self.train_node.train_lorax(
            self.models[name], {"samples": x}, self.enc.per_latent(y), batch_size=cfg.batch_size,
            steps=cfg.adapter_steps, learning_rate=cfg.lorax_lr, rank=cfg.rank, family=FAMILIES[0], seed=seed,
            dtype_choice="fp32", gradient_checkpointing=False, save_name="", engine=self.engine, merge_conds=True)
        self.host.unload_all()
        return handle, losses

    def train_lora(self, name: str, seed: int, style_name: str = STYLE_NAMES[0]):
        from comfy.weight_adapter import LoRAAdapter

        x, y = self.style_set(style_name)
        cfg, bridge, model = self.cfg, self.bridge, self.models[name]
        w = bridge.PatcherWeights(model)
        names = bridge.kohya_names(bridge.unet_key_map(model), internal=True)
        keys = select_layers({k: w.shape(k) for k in w.keys() if k in names}, FAMILIES[0])

        def build():
            modules = {k: LoRAAdapter.create_train(w.weight(k), rank=cfg.lora_rank, alpha=1.0) for k in keys}
            return modules, [p for m in modules.values() for p in m.parameters() if p.requires_grad], modules

        modules, losses = self.train_node.train_weight_wrappers(
            model, build, {"samples": x}, self.enc.per_latent(y), batch_size=cfg.batch_size, steps=cfg.adapter_steps,
            learning_rate=cfg.lora_lr, seed=seed, dtype=torch.float32, gradient_checkpointing=False,
            merge_conds=True)
        self.host.unload_all()
        lora = {}
        for key, m in modules.items():
            p = names[key]
            lora[f"{p}.lora_up.weight"] = m.lora_up.weight.detach().clone()
            lora[f"{p}.lora_down.weight"] = m.lora_down.weight.detach().clone()
            lora[f"{p}.alpha"] = m.alpha.detach().clone()
        return self.handles.AdapterHandle(name="benchmark LoRA", path="", kind="lora", content=lora), losses

    # -- arms --------------------------------------------------------------------------------------
    def patched(self, handle, name: str):
        model = self.models[name]
        if handle.kind == "lora":
            return self.bridge.host_patched_clone(model, handle.content, 1.0)
        return self.bridge.patched_clone(model, handle.deltas_for(model, self.engine).deltas, 1.0)

    def transferred(self, handle, name: str, mode: str, threshold: float | None = None,
                    copy_below: float = DEFAULT_COPY_BELOW, scale_by_norm: bool = False):
        threshold = self.cfg.threshold if threshold is None else threshold
        settings = TransferSettings(rank=self.cfg.rank, threshold=threshold, mode=mode, copy_below=copy_below)
        th = self.transfer_job.run_transfer(self.models["base"], self.models[name], handle, settings, self.engine,
                                            layer_map_mode="similarity")
        rows = th.result.layers
        phis = [l.similarity.phi_hat_min for l in rows if l.similarity is not None]
        changes = [l.weight_change for l in rows if l.weight_change is not None]
        hows: dict[str, int] = {}
        for l in rows:
            if l.how:
                hows[l.how] = hows.get(l.how, 0) + 1
        paired = [l for l in rows if l.delta is not None]
        info = {"moved": len(th.result.deltas), "layers": len(rows), "moved_keys": sorted(th.result.deltas),
                "paired_as_built": sum(l.key == built_from(name, l.target) for l in paired),
                "phi_hat_median": round(statistics.median(phis), 3) if phis else None,
                "phi_hat_min": round(min(phis), 3) if phis else None, "how": hows,
                "copied": hows.get("copied", 0), "copied_keys": sorted(l.target for l in rows if l.how == "copied"),
                "change_median": round(statistics.median(changes), 4) if changes else None,
                "change_range": [round(min(changes), 4), round(max(changes), 4)] if changes else None}
        deltas = th.result.deltas
        info["_deltas"] = deltas
        if scale_by_norm:  # a per-layer strength correction: the delta scaled as the target weight is
            ws, wt = self.bridge.PatcherWeights(self.models["base"]), self.bridge.PatcherWeights(self.models[name])
            deltas = {l.target: l.delta.scaled(float(wt.weight(l.target).float().norm() /
                                                     ws.weight(l.key).float().norm()))
                      for l in rows if l.delta is not None}
        return self.bridge.patched_clone(self.models[name], deltas, 1.0), info

    def copied(self, handle, name: str):
        target = self.models[name]
        shapes = self.bridge.PatcherWeights(target)
        deltas = handle.deltas_for(self.models["base"], self.engine).deltas
        kept = {k: d for k, d in deltas.items() if shapes.shape(k) == tuple(d.shape)}
        info = {"moved": len(kept), "layers": len(deltas)}
        if handle.kind == "lora":  # what the stock LoraLoader applies: the host's own patches, by name
            key_map = self.bridge.unet_key_map(target)
            lora = {k: v for k, v in handle.content.items()
                    if key_map.get(k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]) in kept}
            return self.bridge.host_patched_clone(target, lora, 1.0), info
        return self.bridge.patched_clone(target, kept, 1.0), info

    # -- judging -------------------------------------------------------------------------------------
    def sample(self, patcher) -> tuple[torch.Tensor, torch.Tensor]:
        """Images drawn with ComfyUI's KSampler (euler, normal schedule, cfg 1), ``per_class`` per class."""
        import nodes

        y = torch.arange(10).repeat_interleave(self.cfg.per_class)
        latent = {"samples": torch.zeros(len(y), 1, 8, 8)}
        cond = self.enc.batched(y)
        t0 = time.perf_counter()
        (out,) = nodes.KSampler().sample(patcher, self.seed + 99, self.cfg.sample_steps, 1.0, "euler", "normal",
                                         cond, cond, latent)
        self.host.unload_all()
        self.seconds["sampling"] = self.seconds.get("sampling", 0.0) + time.perf_counter() - t0
        return out["samples"].float().clamp(-1, 1), y

    def predict_eps(self, patcher) -> torch.Tensor:
        import comfy.model_management

        self.host.unload_all()
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        try:
            with torch.no_grad():
                x0 = patcher.model.apply_model(self.eval_xt, self.eval_sigma, c_crossattn=self.eval_ctx,
                                               transformer_options=dict(patcher.model_options["transformer_options"]))
        finally:
            self.host.unload_all()
        return ((self.eval_xt - x0.float()) / self.eval_sigma.reshape(-1, 1, 1, 1)).double()

    def judge(self, name: str, patcher, domain: str) -> dict[str, Any]:
        x, y = self.sample(patcher)
        # Content is judged against the class drawn; the classifier knows every domain, styled or not.
        styles = {st: self.judges.style_score(x, st) for st in self.cfg.styles}
        return {"acc": self.judges.accuracy(x, y), "style": styles[STYLE_NAMES[0]], "styles": styles,
                "eps": self.predict_eps(patcher), "samples": x}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(), b.flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def same_deltas(a: dict, b: dict, rel: float = 1e-9) -> bool:
    """True where two transfers patch the same layers with the same deltas (to ``rel`` of their norms): such
    arms are judged once (``auto`` copying every layer is ``copy``; on LoRA-X ``prolora`` is ``lorax``)."""
    if a.keys() != b.keys():
        return False
    for k, da in a.items():
        db = b[k]
        if tuple(da.shape) != tuple(db.shape):
            return False
        aa, bb = da.inner(da), db.inner(db)
        if aa + bb - 2 * da.inner(db) > rel ** 2 * max(aa, bb, 1e-300):
            return False
    return True


def run_seed(comfy_host, seed: int, cfg: Config, data: Data, enc: ClassEncoder, judges: Judges,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    t0 = time.perf_counter()
    lab = Lab(comfy_host, seed, cfg, data, enc, judges, log)
    lab.build_models()
    log(f"  seed {seed}: models trained ({', '.join(f'{k} {v:.0f} s' for k, v in lab.seconds.items())})")
    res: dict[str, Any] = {"seed": seed, "loss": {}, "models": {}, "targets": {}, "layers": {}, "samples": {},
                           "reused": {}}
    for k, v in lab.losses.items():
        n = max(1, min(20, len(v) // 5))
        res["loss"][k] = {"first": float(np.mean(v[:n])), "last": float(np.mean(v[-n:]))}
    for attr in ("student_copied", "ssd_copied"):
        if hasattr(lab, attr):
            res[attr] = getattr(lab, attr)
    # Every model on its own: class accuracy and style of its samples.
    none = {}
    for name in ["base", *cfg.targets]:
        j = lab.judge(name, lab.models[name], TARGET_DOMAIN[name])
        none[name] = j
        res["models"][name] = {"acc": j["acc"], "style": j["style"], "styles": j["styles"]}
        res["samples"][(name, "none")] = j["samples"]
        if name != "base":
            res["models"][name]["distance"] = float((j["eps"] - none["base"]["eps"]).norm() /
                                                    none["base"]["eps"].norm())
    adapters = adapters_of(cfg.styles)
    trainer = {"LoRA-X": lab.train_lorax, "LoRA": lab.train_lora}
    # Adapters on the base.
    src, on_base = {}, {}
    for i, (kind, st, label) in enumerate(adapters):
        src[label], losses = lab._timed(f"{label} on base", trainer[kind], "base", seed * 1000 + 1 + 100 * i, st)
        res["loss"][f"{label} on base"] = {"first": float(np.mean(losses[:10])), "last": float(np.mean(losses[-10:]))}
        j = lab.judge("base", lab.patched(src[label], "base"), "base")
        on_base[f"{label} GT"] = {"acc": j["acc"], "style": j["styles"][st]}
        res["samples"][("base", f"{label} GT")] = j["samples"]
    res["targets"]["base"] = on_base
    for ti, name in enumerate(cfg.targets):
        arms: dict[str, dict] = {"none": dict(res["models"][name])}
        eps_none = none[name]["eps"]
        judged: dict[str, dict] = {}
        layers = {}
        for i, (kind, st, label) in enumerate(adapters):
            gt, _ = lab._timed(f"{label} GT on {name}", trainer[kind], name, seed * 1000 + 10 + 2 * ti + 100 * i, st)
            judged[f"{label} GT"] = lab.judge(name, lab.patched(gt, name), TARGET_DOMAIN[name])
            done: list[tuple[str, dict]] = []  # (arm, deltas) judged so far for this adapter
            for mode in cfg.modes:
                arm = f"{label} → {mode}"
                patched, info = lab.transferred(src[label], name, mode)
                deltas = info.pop("_deltas")
                twin = next((a for a, d in done if same_deltas(d, deltas)), None)
                if twin is None:
                    judged[arm] = lab.judge(name, patched, TARGET_DOMAIN[name])
                    done.append((arm, deltas))
                else:
                    judged[arm] = judged[twin]
                    res["reused"].setdefault(name, {})[arm] = twin
                layers[arm] = info
            if cfg.scaled:
                patched, info = lab.transferred(src[label], name, "copy", scale_by_norm=True)
                info.pop("_deltas")
                judged[f"{label} → copy ×‖W‖"] = lab.judge(name, patched, TARGET_DOMAIN[name])
                layers[f"{label} → copy ×‖W‖"] = info
            patched, info = lab.copied(src[label], name)
            judged[f"{label} copied"] = lab.judge(name, patched, TARGET_DOMAIN[name])
            layers[f"{label} copied"] = info
        for arm, j in judged.items():
            gt = judged[gt_of(arm)]
            arms[arm] = {"acc": j["acc"], "style": j["styles"][style_of(arm)],
                         "cos": None if j is gt else cosine(j["eps"] - eps_none, gt["eps"] - eps_none)}
            res["samples"][(name, arm)] = j["samples"]
        # Φ̂ threshold: arms re-judged only where another threshold moves another set of layers.
        sweep: dict[str, dict] = {}
        for kind, st, label in adapters:
            if "lorax" not in cfg.modes:
                break
            shipped_keys = layers[f"{label} → lorax"]["moved_keys"]
            for t in cfg.sweep_thresholds:
                patched, info = lab.transferred(src[label], name, "lorax", threshold=t)
                info.pop("_deltas")
                entry = {"moved": info["moved"]}
                if info["moved_keys"] == shipped_keys:
                    entry.update(acc=arms[f"{label} → lorax"]["acc"], style=arms[f"{label} → lorax"]["style"])
                elif info["moved"] == 0:
                    entry.update(acc=arms["none"]["acc"], style=arms["none"]["styles"][st])
                else:
                    j = lab.judge(name, patched, TARGET_DOMAIN[name])
                    entry.update(acc=j["acc"], style=j["styles"][st])
                sweep[f"{label} {t}"] = entry
        # auto's bound: re-judged only where another bound copies another set of layers.
        for kind, st, label in adapters:
            if "auto" not in cfg.modes:
                break
            shipped = layers[f"{label} → auto"]
            for bound in cfg.copy_below:
                patched, info = lab.transferred(src[label], name, "auto", copy_below=bound)
                info.pop("_deltas")
                entry = {"copied": info["copied"], "moved": info["moved"]}
                same = info["copied_keys"] == shipped["copied_keys"]
                j = None if same else lab.judge(name, patched, TARGET_DOMAIN[name])
                base_arm = arms[f"{label} → auto"] if same else {"acc": j["acc"], "style": j["styles"][st]}
                entry.update(acc=base_arm["acc"], style=base_arm["style"])
                sweep[f"{label} auto {bound}"] = entry
        for info in layers.values():
            info.pop("moved_keys", None)
            info.pop("copied_keys", None)
        res["targets"][name] = arms
        res["layers"][name] = layers
        res.setdefault("threshold_sweep", {})[name] = sweep
        log(f"  seed {seed} {name}: " + ", ".join(f"{a} acc {m['acc']:.2f} style {m['style']:.2f}"
                                                 for a, m in arms.items()))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["phase_seconds"] = dict(lab.seconds)
    del lab
    comfy_host.unload_all()
    return res


# --------------------------------------------------------------------------------------
# Summary, table, grid
# --------------------------------------------------------------------------------------


def kept(arm: dict, gt: dict, none: dict, style_name: str = STYLE_NAMES[0]) -> float | None:
    """The share of the GT's gain in its style's probe score over the bare target that an arm keeps."""
    base = none.get("styles", {}).get(style_name, none["style"])
    gain = gt["style"] - base
    return (arm["style"] - base) / gain if gain > 0.05 else None


def kept_of(run: dict, target: str, arm: str, entry: dict | None = None) -> float | None:
    arms = run["targets"][target]
    return kept(entry or arms[arm], arms[gt_of(arm)], arms["none"], style_of(arm))


def mean_sd(values) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan"), 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


def fmt(values, digits: int = 2) -> str:
    m, s, n = mean_sd(values)
    if n == 0:
        return "—"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def print_report(runs: list[dict], cfg: Config, judges_info: dict, out=print) -> None:
    n = len(runs)
    out(f"\nTrained models, {n} seed{'s' if n > 1 else ''} {[r['seed'] for r in runs]} (mean ± sd).")
    out(f"Judges on held-out real images: classifier accuracy " + ", ".join(
        f"{k} {v:.3f}" for k, v in judges_info["classifier"].items()) + "; style probe accuracy " +
        ", ".join(f"{k} {v:.3f}" for k, v in judges_info.get("probes", {"grey": judges_info["probe"]}).items()))
    out("\nModels on their own (samples drawn with KSampler; class accuracy by the classifier; style = "
        "P(styled)); training loss first → last; output distance from the base on held-out inputs:")
    for name in ["base", *cfg.targets]:
        ms = [r["models"][name] for r in runs]
        loss = [r["loss"][name] for r in runs]
        dist = f", distance {fmt([m.get('distance') for m in ms])}" if name != "base" else ""
        out(f"  {name:<10} acc {fmt([m['acc'] for m in ms])}  style {fmt([m['style'] for m in ms])}  loss "
            f"{fmt([l['first'] for l in loss], 3)} → {fmt([l['last'] for l in loss], 3)}{dist}")
    b = [r["targets"]["base"] for r in runs]
    out("  adapters on the base: " + ", ".join(
        f"{arm} acc {fmt([x[arm]['acc'] for x in b])} style {fmt([x[arm]['style'] for x in b])}"
        for arm in (f"{label} GT" for _, _, label in adapters_of(cfg.styles))))
    for attr, what in (("student_copied", "BK-SDM student"), ("ssd_copied", "SSD-1B-style student")):
        if attr in runs[0]:
            out(f"  {what}: {runs[0][attr][0]} of {runs[0][attr][1]} tensors initialised from the base (seed "
                f"{runs[0]['seed']})")
    out("\nArms (kept = share of the GT's style gain over the bare target; cos = output change vs the GT's on "
        "held-out noisy inputs):")
    out(f"  {'target':<10} {'arm':<24} {'class acc':>12} {'style':>12} {'kept':>12} {'cos vs GT':>12}  layers")
    arm_list = cfg.arms
    for name in cfg.targets:
        for arm in arm_list:
            per = [r["targets"][name][arm] for r in runs]
            ks = [kept_of(r, name, arm) for r in runs] if arm != "none" else []
            lay = runs[0]["layers"][name].get(arm)
            lay_s = f"{lay['moved']}/{lay['layers']}" + (f" ({lay['paired_as_built']} paired as built)" if lay.get(
                "paired_as_built") is not None and name in ("distilled", "ssd") else "") + (f" Φ̂ med {lay['phi_hat_median']}" if lay.get(
                "phi_hat_median") is not None else "") + (f", {lay['copied']} copied" if lay.get("copied") else
                                                          "") + (f", ΔW med {lay['change_median']}" if lay.get(
                "change_median") is not None else "") if lay else ""
            twin = runs[0].get("reused", {}).get(name, {}).get(arm)
            lay_s += f" (the same deltas as {twin}: judged once)" if twin else ""
            out(f"  {name:<10} {arm:<24} {fmt([p['acc'] for p in per]):>12} {fmt([p['style'] for p in per]):>12} "
                f"{fmt(ks):>12} {fmt([p.get('cos') for p in per]):>12}  {lay_s}")


def print_sweep(runs: list[dict], cfg: Config, out=print) -> None:
    if cfg.sweep_thresholds:
        _print_threshold_sweep(runs, cfg, out)
    _print_bound_sweep(runs, cfg, out)


def _print_threshold_sweep(runs: list[dict], cfg: Config, out=print) -> None:
    out(f"\nΦ̂ threshold (mode lorax; shipped {cfg.threshold}): style / class acc / kept, layers moved (seed "
        f"{runs[0]['seed']})")
    for name in cfg.targets:
        for _, _, kind in adapters_of(cfg.styles):
            cells = []
            for t in (cfg.threshold, *cfg.sweep_thresholds):
                per = [r["targets"][name][f"{kind} → lorax"] if t == cfg.threshold else
                       r["threshold_sweep"][name][f"{kind} {t}"] for r in runs]
                ks = [kept_of(r, name, f"{kind} → lorax", p) for p, r in zip(per, runs)]
                moved = (runs[0]["layers"][name][f"{kind} → lorax"]["moved"] if t == cfg.threshold
                         else runs[0]["threshold_sweep"][name][f"{kind} {t}"]["moved"])
                cells.append(f"{t}: {fmt([p['style'] for p in per])} / {fmt([p['acc'] for p in per])} / "
                             f"{fmt(ks)} ({moved})")
            out(f"  {name:<10} {kind:<7} " + "   ".join(cells))


def _print_bound_sweep(runs: list[dict], cfg: Config, out=print) -> None:
    if "auto" not in cfg.modes or not cfg.copy_below:
        return
    out(f"\nauto's bound (copy where the weight moved ≤ bound; shipped {DEFAULT_COPY_BELOW}): style / class acc / "
        f"kept (layers copied, seed {runs[0]['seed']})")
    for name in cfg.targets:
        for _, _, kind in adapters_of(cfg.styles):
            cells = []
            for bound in sorted((DEFAULT_COPY_BELOW, *cfg.copy_below)):
                per = [r["targets"][name][f"{kind} → auto"] if bound == DEFAULT_COPY_BELOW else
                       r["threshold_sweep"][name][f"{kind} auto {bound}"] for r in runs]
                ks = [kept_of(r, name, f"{kind} → auto", p) for p, r in zip(per, runs)]
                copied = (runs[0]["layers"][name][f"{kind} → auto"]["copied"] if bound == DEFAULT_COPY_BELOW
                          else runs[0]["threshold_sweep"][name][f"{kind} auto {bound}"]["copied"])
                cells.append(f"{bound}: {fmt([p['style'] for p in per])} / {fmt([p['acc'] for p in per])} / "
                             f"{fmt(ks)} ({copied})")
            out(f"  {name:<10} {kind:<7} " + "   ".join(cells))


def save_grid(run: dict, cfg: Config, path: str, data: Data | None = None) -> None:
    """One row per (model, arm): one sample per class, 8×8 pixels drawn at 4× (one seed)."""
    from PIL import Image, ImageDraw

    samples = dict(run["samples"])
    rows = []
    if data is not None:  # real held-out images, one per class, of each domain and styled
        first = torch.stack([data.test_x[data.test_y == c][0] for c in range(10)])
        spread = first.repeat_interleave(cfg.per_class, 0)
        for dom in ("base", *[t for t in cfg.targets if t in DOMAINS]):
            samples[("real", dom)] = DOMAINS[dom](spread)
            rows.append(("real", dom))
        for st in cfg.styles:
            samples[("real", f"base {st}")] = STYLES[st](spread)
            rows.append(("real", f"base {st}"))
    rows += [("base", "none"), *(("base", f"{label} GT") for _, _, label in adapters_of(cfg.styles))]
    shown = ("GT", "→ auto", "→ transport", "→ prolora", "copied")  # the grid's arms; the tables have them all
    rows += [(t, a) for t in cfg.targets for a in cfg.arms if a == "none" or a.split(" ", 1)[1] in shown]
    scale, label_w = 4, 270
    cell = 8 * scale + 2
    img = Image.new("L", (label_w + 10 * cell, len(rows) * cell), 255)
    draw = ImageDraw.Draw(img)
    for r, key in enumerate(rows):
        x = samples[key]
        draw.text((4, r * cell + cell // 2 - 6), f"{key[0]}: {key[1]}".replace("→", "->"), fill=0)
        for c in range(10):
            s = x[c * cfg.per_class]
            arr = ((s[0].numpy() + 1) * 127.5).clip(0, 255).astype("uint8")
            tile = Image.fromarray(arr).resize((8 * scale, 8 * scale), Image.NEAREST)
            img.paste(tile, (label_w + c * cell + 1, r * cell + 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def run(cfg: Config, log: Callable[[str], None] = print, comfy_host=None,
        judges: Judges | None = None) -> tuple[list[dict], dict]:
    """Every seed of ``cfg`` in this process; ``judges`` trained here unless given (they do not depend on the seed)."""
    comfy_host = comfy_host or host.get_comfy_host()
    import comfy.utils

    comfy_host.load_pack(host.REPO_ROOT)
    bars, comfy.utils.PROGRESS_BAR_ENABLED = comfy.utils.PROGRESS_BAR_ENABLED, False
    t0 = time.perf_counter()
    data, enc = load_data(), ClassEncoder()
    judges = judges or Judges(data, styles=cfg.styles)
    info = {"classifier": judges.held_out, "probe": judges.probe_held_out, "probes": judges.probe_accuracy,
            "seconds": round(time.perf_counter() - t0, 1)}
    log(f"judges ready in {info['seconds']} s: classifier on held-out images " +
        ", ".join(f"{k} {v:.3f}" for k, v in judges.held_out.items()) + "; style probes " +
        ", ".join(f"{k} {v:.3f}" for k, v in judges.probe_accuracy.items()))
    runs = []
    try:
        for seed in cfg.seeds:
            with torch.inference_mode():
                runs.append(run_seed(comfy_host, seed, cfg, data, enc, judges, log=log))
            log(f"seed {seed}: {runs[-1]['seconds']:.0f} s (load average {load_average()})")
    finally:
        comfy.utils.PROGRESS_BAR_ENABLED = bars
    info["data"] = data
    return runs, info


def run_in_processes(args, cfg: Config) -> tuple[list[dict], dict, float]:
    """Each seed in a child process of this script (``--seeds s --json …``), ``--jobs`` at a time; the seeds are
    independent (every model, adapter and judge is made from the seed), so the figures are those of one process."""
    import tempfile

    import pickle

    tmp = Path(tempfile.mkdtemp(prefix="trained_fidelity_"))
    t0 = time.perf_counter()
    judges = Judges(load_data(), styles=cfg.styles)  # once, not once a child: they depend on the data alone
    (tmp / "judges.pkl").write_bytes(pickle.dumps(judges))
    print(f"judges trained in {time.perf_counter() - t0:.0f} s (load average {load_average()})", flush=True)
    pending, running, results = list(cfg.seeds), [], {}
    common = ["--threads", str(args.threads), "--judges", str(tmp / "judges.pkl")] + (
        ["--quick"] if args.quick else []) + (
        ["--targets", args.targets] if args.targets else []) + (["--verbose"] if args.verbose else [])
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            extra = ["--grid", args.grid] if args.grid and seed == cfg.seeds[0] else []
            extra += ["--samples", f"{args.samples}.seed{seed}.pt"] if args.samples else []
            cmd = [sys.executable, str(Path(__file__).resolve()), "--seeds", str(seed), "--json",
                   str(tmp / f"{seed}.json"), *common, *extra]
            log = open(tmp / f"{seed}.log", "w")
            running.append((seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
            print(f"seed {seed}: started (log {tmp / f'{seed}.log'})", flush=True)
        time.sleep(2)
        for item in list(running):
            seed, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                raise SystemExit(f"seed {seed} failed (exit {proc.returncode}); see {tmp / f'{seed}.log'}")
            results[seed] = json.loads((tmp / f"{seed}.json").read_text())
            print(f"seed {seed}: {results[seed]['runs'][0]['seconds']:.0f} s (load average {load_average()})",
                  flush=True)
    import resource

    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    runs = [results[s]["runs"][0] for s in cfg.seeds]
    return runs, results[cfg.seeds[0]]["judges"], cpu.ru_utime + cpu.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, base + fine-tune, small budget")
    ap.add_argument("--seeds", type=str, help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--targets", type=str, help=f"comma-separated, from {','.join(TARGETS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=str, help="write every figure to this file")
    ap.add_argument("--grid", type=str, help="write a grid of samples (first seed) to this PNG")
    ap.add_argument("--samples", type=str, help="save every arm's samples (torch.save) to this file")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run up to this many seeds at once, each in its own process (one torch thread each)")
    ap.add_argument("--judges", type=str, help=argparse.SUPPRESS)  # a pickled Judges (the parent's, with --jobs)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not args.verbose:
        logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else Config()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.targets:
        cfg = replace(cfg, targets=tuple(t.strip() for t in args.targets.split(",")))
    t0, cpu0 = time.perf_counter(), time.process_time()
    print(f"trained-model fidelity: seeds {list(cfg.seeds)}, targets {list(cfg.targets)}, styles "
          f"{list(cfg.styles)}, torch threads {torch.get_num_threads()}, jobs {args.jobs}, load average "
          f"{load_average()}", flush=True)
    if args.jobs > 1 and len(cfg.seeds) > 1:
        runs, info, cpu_children = run_in_processes(args, cfg)
        cpu0 -= cpu_children
    else:
        import pickle

        judges = pickle.loads(Path(args.judges).read_bytes()) if args.judges else None
        runs, info = run(cfg, judges=judges)
    print_report(runs, cfg, info)
    print_sweep(runs, cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(f"\ntotal {wall:.0f} s wall, {cpu:.0f} s CPU; load average at the end {load_average()}")
    in_processes = "data" not in info  # the children wrote the grid and the samples
    if args.grid and not in_processes:
        save_grid(runs[0], cfg, args.grid, info["data"])
    if args.samples and not in_processes:
        torch.save([{"seed": r["seed"], "samples": r["samples"]} for r in runs], args.samples)
    if args.json:
        slim = [{k: v for k, v in r.items() if k != "samples"} for r in runs]
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "judges": {k: v for k, v in info.items() if k != "data"}, "runs": slim, "wall_s": wall}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
