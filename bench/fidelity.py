#!/usr/bin/env python3
"""Fidelity benchmark: does a transferred adapter behave like one trained on the target? (not a test)

The seed paper's claim (LoRA-X, Tables 1–2) is that a LoRA-X adapter moved training-free to a
related checkpoint performs within a few percent of one trained on that checkpoint, while an
ordinary LoRA loses much more. Real checkpoints and image metrics (HPSv2) are out of reach here,
so this is the closest honest stand-in that runs on a CPU in minutes, inside the real ComfyUI
host (``tests/host.py``): real ``ModelPatcher``s, ComfyUI's own training loop, LoRA modules, LoRA
loader and key maps, and the pack's own Train/Transfer code paths.

The world (one per seed)
------------------------
* **Source**: the tests' mini SD1.5 UNet (``host.build_mini_sd15_unet``: SD1.5's widths 320/640,
  context 768, two levels, power-law spectra), ComfyUI detects it as SD15.
* **Targets** of increasing distance: ``light`` — ``host.fine_tune`` at 5 % of each weight's norm
  (half of it a random rank-8 change); ``heavy`` — 20 % of the norm, 80 % of that in a rank-8
  change (a fine-tune with its own low-rank structure); ``distilled`` — a one-level (320-wide)
  UNet: the 640-wide level is removed, the middle block (now 320 wide) is new, and every other
  layer whose shape allows it is a copy of its source counterpart (output blocks renumbered, as
  ComfyUI numbers what is left) perturbed with a per-layer strength drawn log-uniformly in
  [0.1, 4] (distillation retrains kept blocks by different amounts, so Φ̂ spans ~0.2–1).
* **Task** ("style"): a fixed function of the model's own output, ε ↦ Aε + b with A = I + s·M
  (M a random 4×4 matrix of spectral norm 1, s = ``style_strength``) and a random shift b — a
  colour-matrix-and-shift map on the predicted noise. The adapter must make the model compute
  ``style(model(x))`` itself. Training data: ``n_train`` latents with one random text
  conditioning each (``tokens`` × 768), noise and noise levels drawn by ComfyUI's training loop.
* **Held-out inputs**: ``n_eval`` fresh latents, noise and conditionings at noise levels spread
  evenly over the schedule.

Arms (every adapter on the attention projections to_q/k/v/out of every transformer block)
------------------------------------------------------------------------------------------
* ``GT`` — LoRA-X (Δσ of the top-r singular values, r = ``DEFAULT_RANK`` capped at each layer's
  rank) trained on the target with the LoRA-X Train node's code (``train_lorax``, distilling a
  style teacher: a separately loaded copy of the target with the style map on its output).
  ``GT (retrained)`` — the same with another training seed: how well the task pins the answer down.
* ``LoRA-X → lorax`` / ``→ prolora`` — LoRA-X trained on the source, moved with the LoRA-X Transfer
  node's code (``run_transfer``: layer map by role and Φ̂, shipped threshold); ``LoRA-X copied`` —
  its delta ``U_s diag(Δσ) V_sᵀ`` added to the target's layers of the same name and shape.
* ``LoRA GT`` — an ordinary rank-``lora_rank`` LoRA (the host's own ``LoRAAdapter.create_train``
  modules) trained on the target through the same host loop (``train_weight_wrappers``).
  ``LoRA copied`` — the source-trained LoRA loaded onto the target the way the stock LoraLoader
  does (by name; layers whose shapes differ are left out, as ComfyUI skips them);
  ``LoRA → lorax`` / ``→ prolora`` — moved with ``run_transfer`` (k = ``DEFAULT_RANK`` capped at
  half each layer's rank).

Metrics, on the held-out inputs, per target: the output change an arm makes, ``Δ = ε_arm − ε_target``
(all held-out outputs flattened), against the ground truth's ``Δ_GT``: cosine similarity and
relative error ``‖Δ − Δ_GT‖/‖Δ_GT‖``; LoRA-X arms are compared with ``GT``, LoRA arms with ``LoRA
GT`` (the paper compares each adapter type with itself trained on the target); and the **task
loss** ``‖ε_arm − style(ε_target)‖² / ‖ε_target − style(ε_target)‖²`` (1 = the style not learnt at
all, 0 = perfectly), and **kept** ``(1 − task)/(1 − task of its GT)``, the share of the ground truth's
improvement an arm keeps. Mean ± standard deviation over seeds; each target's output distance from
the source ``‖ε_t − ε_s‖/‖ε_s‖`` is printed with it.

Sweeps (the shipped ``lorax.transfer.DEFAULT_RANK`` / ``DEFAULT_THRESHOLD``; projection ``lorax``)
---------------------------------------------------------------------------------------------------
* Φ̂ threshold, for the LoRA-X and the LoRA transfer (mode lorax).
* k of the ordinary-LoRA transfer (``TransferSettings(rank=k)``, capped at half each layer's rank
  as shipped).
* r of LoRA-X training (``rank`` of LoRA-X Train, the same constant): trained on the source at r,
  transferred (k = the adapter's r); compared with the default-r GT and by task loss.
Each sweep prints the mean task loss per target and overall, and the best value (lowest mean; the
shipped one on a tie) next to the shipped one, with the number of (seed, target) pairs where it wins.

What it does not show: image quality, prompts, or anything about trained checkpoints — the weights
are random matrices with realistic spectra, the "style" is a linear map of the output, and the
targets' distances are chosen, not measured on real models. See docs/fidelity.md.

Usage::

    .venv/bin/python bench/fidelity.py                 # full run: 3 seeds, 3 targets, sweeps
    .venv/bin/python bench/fidelity.py --quick         # one seed, the heavy target, small sweeps
    .venv/bin/python bench/fidelity.py --json out.json # also write every figure as JSON
    .venv/bin/python bench/fidelity.py --fast          # what tests/test_fidelity.py runs (~40 s)
    .venv/bin/python bench/fidelity.py --calibrate     # held-out task loss per learning rate

Deterministic given the seeds (fixed thread count; see ``--threads``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
for _p in (REPO_ROOT / "tests", REPO_ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
if str(REPO_ROOT / "bench") not in sys.path:  # measure.py, when the tests load this file by path
    sys.path.append(str(REPO_ROOT / "bench"))

import torch  # noqa: E402

import host  # noqa: E402  (the tests' in-process ComfyUI host; the benchmark is not part of the pack)
from measure import load_average  # noqa: E402
from lorax.transfer import DEFAULT_RANK, DEFAULT_THRESHOLD, TransferSettings  # noqa: E402
from lorax.training import FAMILIES, select_layers  # noqa: E402

TARGETS: tuple[str, ...] = ("light", "heavy", "distilled")
LORAX_ARMS = ("GT", "GT (retrained)", "LoRA-X → lorax", "LoRA-X → prolora", "LoRA-X copied")
LORA_ARMS = ("LoRA GT", "LoRA → lorax", "LoRA → prolora", "LoRA copied")


@dataclass(frozen=True)
class Config:
    """Everything a run depends on (with the seeds, the whole result)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    targets: tuple[str, ...] = TARGETS
    channel_mult: tuple[int, ...] = (1, 2)  # the source's levels (the distilled target needs (1, 2))
    latent_px: int = 4            # latent side (a 32×32-pixel image)
    n_train: int = 16             # training latents (each with its own conditioning)
    n_eval: int = 16              # held-out inputs
    tokens: int = 4               # conditioning tokens (× 768)
    batch_size: int = 4
    steps: int = 24
    lorax_lr: float = 0.002       # Adam, in units of singular values
    lora_lr: float = 0.001
    lora_rank: int = 16
    style_strength: float = 0.5
    style_shift: float = 0.2
    light_strength: float = 0.05
    heavy_strength: float = 0.2
    distilled_range: tuple[float, float] = (0.1, 4.0)
    family: str = FAMILIES[0]
    rank: int = DEFAULT_RANK
    threshold: float = DEFAULT_THRESHOLD
    sweep_thresholds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99)
    sweep_k: tuple[int, ...] = (8, 16, 32, 64, 128, 160, 320)
    sweep_r: tuple[int, ...] = (8, 32, 160)


QUICK = Config(seeds=(0,), targets=("heavy",), steps=20, n_eval=8, sweep_thresholds=(0.0, 0.3, 0.9),
               sweep_k=(16, 320), sweep_r=())
#: What tests/test_fidelity.py runs: one seed, the heavy target, on a one-level (320-wide, 26 M parameter)
#: source so that every arm trains in seconds.
FAST = replace(QUICK, channel_mult=(1,), steps=10, sweep_thresholds=(0.0, 0.3), sweep_k=(16, 320))


# --------------------------------------------------------------------------------------
# The world: source, targets, style, data
# --------------------------------------------------------------------------------------


def _generator(seed: int, salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed * 7_919 + salt)
    return g


class StyleMap:
    """``ε ↦ Aε + b`` on the 4 latent channels: the "style" every adapter must learn."""

    def __init__(self, seed: int, strength: float, shift: float):
        g = _generator(seed, 11)
        m = torch.randn(4, 4, generator=g, dtype=torch.float64)
        self.A = (torch.eye(4, dtype=torch.float64) + strength * m / torch.linalg.matrix_norm(m, ord=2)).float()
        self.b = (shift * torch.randn(4, generator=g, dtype=torch.float64)).float()

    def __call__(self, eps: torch.Tensor) -> torch.Tensor:
        A, b = self.A.to(eps), self.b.to(eps)
        return torch.einsum("ij,bj...->bi...", A, eps) + b.reshape(1, 4, *([1] * (eps.dim() - 2)))


def _renumbered_source_key(key: str) -> str:
    """The source key of a layer of the one-level target (its output blocks 0, 1 are the source's 2, 3)."""
    if key.startswith("output_blocks."):
        head, idx, rest = key.split(".", 2)
        return f"{head}.{int(idx) + 2}.{rest}"
    return key


def distilled_target(source: Mapping[str, torch.Tensor], seed: int, strengths: tuple[float, float]) -> dict:
    """A one-level UNet whose layers are perturbed copies of the source's where the shapes allow."""
    fresh = host.build_mini_sd15_unet(seed + 1_000, channel_mult=(1,))
    g = _generator(seed, 23)
    lo, hi = (math.log(s) for s in strengths)
    out = {}
    for key, w in fresh.items():
        src = source.get(_renumbered_source_key(key))
        if key.startswith("middle_block.") or src is None or src.shape != w.shape:
            out[key] = w
            continue
        strength = math.exp(lo + (hi - lo) * float(torch.rand(1, generator=g)))
        out[key] = host.fine_tune({key: src}, seed + 2_000, strength=strength, rank=8, dense_fraction=0.2)[key]
    return out


def build_targets(source: Mapping[str, torch.Tensor], seed: int, cfg: Config) -> dict[str, dict]:
    if "distilled" in cfg.targets and tuple(cfg.channel_mult) != (1, 2):
        raise ValueError("the distilled target removes the second level: it needs a source with channel_mult (1, 2)")
    makers = {
        "light": lambda: host.fine_tune(source, seed + 1, strength=cfg.light_strength),
        "heavy": lambda: host.fine_tune(source, seed + 2, strength=cfg.heavy_strength, rank=8, dense_fraction=0.2),
        "distilled": lambda: distilled_target(source, seed + 3, cfg.distilled_range),
    }
    return {name: makers[name]() for name in cfg.targets}


@dataclass
class Inputs:
    """A batch of noisy latents, their noise levels and conditionings."""

    xt: torch.Tensor
    sigma: torch.Tensor
    context: torch.Tensor


# --------------------------------------------------------------------------------------
# The lab: host, models, training, transfer, evaluation
# --------------------------------------------------------------------------------------


class Lab:
    """One seed's world on the real host, and the operations the arms are made of."""

    def __init__(self, comfy_host, seed: int, cfg: Config):
        import comfy.sd

        self.host, self.seed, self.cfg = comfy_host, seed, cfg
        pack = comfy_host.pack_module(host.REPO_ROOT)
        self.train_node = pack.nodes.train_node
        self.transfer_job = pack.nodes.transfer_job
        self.bridge = pack.nodes.bridge
        self.handles = pack.nodes.handles
        self.engine = pack.nodes.runtime.get_engine()
        self._load = lambda sd: comfy.sd.load_diffusion_model_state_dict(dict(sd))

        t0 = time.perf_counter()
        self.style = StyleMap(seed, cfg.style_strength, cfg.style_shift)
        self.source_sd = host.build_mini_sd15_unet(seed, channel_mult=cfg.channel_mult)
        self.target_sds = build_targets(self.source_sd, seed, cfg)
        self.source = self._load(self.source_sd)
        self.targets = {name: self._load(sd) for name, sd in self.target_sds.items()}
        self.world_seconds = round(time.perf_counter() - t0, 1)

        g = _generator(seed, 31)
        px, ctx = cfg.latent_px, (cfg.tokens, 768)
        self.train_latents = {"samples": torch.randn(cfg.n_train, 4, px, px, generator=g)}
        self.train_positive = [[torch.randn(1, *ctx, generator=g), {}] for _ in range(cfg.n_train)]
        sampling = self.source.model.model_sampling
        sigma = torch.stack([sampling.percent_to_sigma((i + 0.5) / cfg.n_eval) * torch.ones(()) for i in
                             range(cfg.n_eval)]).float()
        latents = torch.randn(cfg.n_eval, 4, px, px, generator=g)
        noise = torch.randn(cfg.n_eval, 4, px, px, generator=g)
        self.eval_inputs = Inputs(xt=sampling.noise_scaling(sigma, noise, latents, False).float(), sigma=sigma,
                                  context=torch.randn(cfg.n_eval, *ctx, generator=g))
        self.base_eps: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}

    def _clock(self, phase: str, t0: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    # -- models ----------------------------------------------------------------------
    def model(self, name: str):
        return self.source if name == "source" else self.targets[name]

    def model_sd(self, name: str):
        return self.source_sd if name == "source" else self.target_sds[name]

    def style_teacher(self, name: str):
        """A separately loaded copy of model ``name`` whose output is the style map of its own."""
        teacher = self._load(self.model_sd(name))
        style = self.style

        def styled(apply_model, args):
            x, t = args["input"], args["timestep"]
            x0 = apply_model(x, t, **args["c"])
            s = t.reshape(-1, *([1] * (x.dim() - 1))).to(x)
            return x - s * style((x - x0) / s)

        teacher.set_model_unet_function_wrapper(styled)
        return teacher

    def predict_eps(self, patcher, inputs: Inputs | None = None) -> torch.Tensor:
        """ε the (patched) model predicts for the held-out inputs, loaded the way ComfyUI loads it."""
        import comfy.model_management

        inputs = inputs or self.eval_inputs
        t0 = time.perf_counter()
        self.host.unload_all()
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        try:
            with torch.no_grad():
                x0 = patcher.model.apply_model(inputs.xt, inputs.sigma, c_crossattn=inputs.context)
        finally:
            self.host.unload_all()
        s = inputs.sigma.reshape(-1, 1, 1, 1)
        self._clock("evaluate", t0)
        return ((inputs.xt - x0.float()) / s).double()

    def base(self, name: str) -> torch.Tensor:
        if name not in self.base_eps:
            self.base_eps[name] = self.predict_eps(self.model(name))
        return self.base_eps[name]

    # -- training --------------------------------------------------------------------
    def _train_seed(self, arm: int) -> int:
        return self.seed * 1_000 + arm

    def train_lorax(self, name: str, *, rank: int, arm: int):
        """A LoRA-X adapter trained on model ``name`` to produce the style (the LoRA-X Train node's code)."""
        cfg = self.cfg
        teacher = self.style_teacher(name)
        try:
            _, handle, losses, _ = self.train_node.train_lorax(
                self.model(name), self.train_latents, self.train_positive, batch_size=cfg.batch_size,
                steps=cfg.steps, learning_rate=cfg.lorax_lr, rank=rank, family=cfg.family,
                seed=self._train_seed(arm), dtype_choice="fp32", gradient_checkpointing=False, save_name="",
                teacher=teacher, engine=self.engine)
        finally:
            del teacher
            self.host.unload_all()
        return handle, losses

    def train_lora(self, name: str, *, rank: int, arm: int):
        """An ordinary LoRA (the host's own LoRA training modules) trained the same way; a kohya state dict."""
        from comfy.weight_adapter import LoRAAdapter

        cfg, bridge = self.cfg, self.bridge
        model = self.model(name)
        weights = bridge.PatcherWeights(model)
        names = bridge.kohya_names(bridge.unet_key_map(model), internal=True)
        keys = select_layers({k: weights.shape(k) for k in weights.keys() if k in names}, cfg.family)

        def build():
            modules = {k: LoRAAdapter.create_train(weights.weight(k), rank=rank, alpha=1.0) for k in keys}
            params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
            return modules, params, modules

        teacher = self.style_teacher(name)
        try:
            modules, losses = self.train_node.train_weight_wrappers(
                model, build, self.train_latents, self.train_positive, batch_size=cfg.batch_size, steps=cfg.steps,
                learning_rate=cfg.lora_lr, seed=self._train_seed(arm), dtype=torch.float32,
                gradient_checkpointing=False, teacher=teacher)
        finally:
            del teacher
            self.host.unload_all()
        lora = {}
        for key, m in modules.items():
            prefix = names[key]
            lora[f"{prefix}.lora_up.weight"] = m.lora_up.weight.detach().clone()
            lora[f"{prefix}.lora_down.weight"] = m.lora_down.weight.detach().clone()
            lora[f"{prefix}.alpha"] = m.alpha.detach().clone()
        return self.handles.AdapterHandle(name="benchmark LoRA", path="", kind="lora", content=lora), losses

    # -- moving adapters -------------------------------------------------------------
    def transferred(self, handle, name: str, settings: TransferSettings):
        """The target patched with the adapter moved by the LoRA-X Transfer node's code; and its handle."""
        t0 = time.perf_counter()
        th = self.transfer_job.run_transfer(self.source, self.model(name), handle, settings, self.engine,
                                            layer_map_mode="similarity")
        self._clock("transfer", t0)
        return self.bridge.patched_clone(self.model(name), th.result.deltas, 1.0), th

    def copied(self, handle, name: str):
        """The target with the adapter's source deltas added by layer name (equal shapes only)."""
        target = self.model(name)
        shapes = self.bridge.PatcherWeights(target)
        deltas = handle.deltas_for(self.source, self.engine).deltas
        kept = {k: d for k, d in deltas.items() if shapes.shape(k) == tuple(d.shape)}
        if handle.kind == "lora":  # what the stock LoraLoader applies: the host's own patches
            key_map = self.bridge.unet_key_map(target)
            lora = {k: v for k, v in handle.content.items() if key_map.get(k.rsplit(".", 2)[0] if k.endswith(
                ".weight") else k.rsplit(".", 1)[0]) in kept}
            return self.bridge.host_patched_clone(target, lora, 1.0), len(kept), len(deltas)
        return self.bridge.patched_clone(target, kept, 1.0), len(kept), len(deltas)

    def patched(self, handle, name: str):
        """Model ``name`` with an adapter trained on it (LoRA-X: its own deltas; LoRA: the host's patches)."""
        model = self.model(name)
        if handle.kind == "lora":
            return self.bridge.host_patched_clone(model, handle.content, 1.0)
        return self.bridge.patched_clone(model, handle.deltas_for(model, self.engine).deltas, 1.0)

    # -- metrics ---------------------------------------------------------------------
    def metrics(self, name: str, eps: torch.Tensor, reference: torch.Tensor | None) -> dict[str, float]:
        base = self.base(name)
        want = self.style(base)
        out = {"task": float((eps - want).square().sum() / (base - want).square().sum())}
        if reference is not None:
            d, r = (eps - base).flatten(), (reference - base).flatten()
            out["cos"] = float(d @ r / (d.norm() * r.norm()).clamp_min(1e-300))
            out["rel_err"] = float((d - r).norm() / r.norm().clamp_min(1e-300))
        return out


# --------------------------------------------------------------------------------------
# One seed
# --------------------------------------------------------------------------------------


def settings(cfg: Config, **kw) -> TransferSettings:
    return TransferSettings(**{"rank": cfg.rank, "threshold": cfg.threshold, "mode": "lorax", **kw})


def run_seed(comfy_host, seed: int, cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every arm and sweep for one seed: ``{"targets": {name: {arm: metrics}}, "sweeps": …, "seconds": …}``."""
    t0 = time.perf_counter()
    lab = Lab(comfy_host, seed, cfg)
    train_s: dict[str, float] = {}

    def timed(label, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        train_s[label] = round(time.perf_counter() - t, 2)
        return out

    src_lorax, src_lorax_loss = timed("LoRA-X on source", lab.train_lorax, "source", rank=cfg.rank, arm=1)
    src_lora, src_lora_loss = timed("LoRA on source", lab.train_lora, "source", rank=cfg.lora_rank, arm=2)
    results: dict[str, Any] = {"seed": seed, "targets": {}, "sweeps": {"threshold": {}, "k": {}, "r": {}},
                               "source": {}, "layers": {}}
    # On the source itself: what the source-trained adapters achieve there (capacity), and the check that
    # moving a LoRA-X adapter onto its own source changes nothing.
    src_eps = {"LoRA-X": lab.predict_eps(lab.patched(src_lorax, "source")),
               "LoRA": lab.predict_eps(lab.patched(src_lora, "source"))}
    results["source"] = {k: lab.metrics("source", v, None) for k, v in src_eps.items()}

    sweep_r_handles = {r: timed(f"LoRA-X r={r} on source", lab.train_lorax, "source", rank=r, arm=10 + i)[0]
                       for i, r in enumerate(cfg.sweep_r)}

    for ti, name in enumerate(cfg.targets):
        gt, gt_loss = timed(f"GT on {name}", lab.train_lorax, name, rank=cfg.rank, arm=100 + 10 * ti)
        gt2, _ = timed(f"GT (retrained) on {name}", lab.train_lorax, name, rank=cfg.rank, arm=101 + 10 * ti)
        lora_gt, _ = timed(f"LoRA GT on {name}", lab.train_lora, name, rank=cfg.lora_rank, arm=102 + 10 * ti)
        eps_gt = lab.predict_eps(lab.patched(gt, name))
        eps_lora_gt = lab.predict_eps(lab.patched(lora_gt, name))
        arms: dict[str, dict] = {}
        arms["GT"] = lab.metrics(name, eps_gt, None)
        arms["GT (retrained)"] = lab.metrics(name, lab.predict_eps(lab.patched(gt2, name)), eps_gt)
        arms["LoRA GT"] = lab.metrics(name, eps_lora_gt, None)
        arms["LoRA GT"]["cos_vs_GT"] = lab.metrics(name, eps_lora_gt, eps_gt)["cos"]
        layers: dict[str, Any] = {}
        for kind, handle, ref in (("LoRA-X", src_lorax, eps_gt), ("LoRA", src_lora, eps_lora_gt)):
            for mode in ("lorax", "prolora"):
                patched, th = lab.transferred(handle, name, settings(cfg, mode=mode))
                arms[f"{kind} → {mode}"] = lab.metrics(name, lab.predict_eps(patched), ref)
                if mode == "lorax":
                    layers[kind] = _decisions(th)
            patched, n_kept, n_all = lab.copied(handle, name)
            arms[f"{kind} copied"] = lab.metrics(name, lab.predict_eps(patched), ref)
            arms[f"{kind} copied"]["layers"] = f"{n_kept}/{n_all}"
        results["targets"][name] = arms
        results["layers"][name] = layers
        base, src = lab.base(name), lab.base("source")
        results.setdefault("distance", {})[name] = float((base - src).norm() / src.norm()) \
            if base.shape == src.shape else float("nan")

        # Sweeps: threshold (both adapter kinds), k (ordinary LoRA), r (LoRA-X training rank).
        thr: dict[str, dict] = {}
        for kind, handle, ref in (("LoRA-X", src_lorax, eps_gt), ("LoRA", src_lora, eps_lora_gt)):
            seen: dict[frozenset, dict] = {}
            for t in cfg.sweep_thresholds:
                patched, th = lab.transferred(handle, name, settings(cfg, threshold=t))
                moved = frozenset(th.result.deltas)
                if moved not in seen:  # same layers moved: the same deltas, the same outputs
                    seen[moved] = lab.metrics(name, lab.predict_eps(patched), ref)
                    seen[moved]["moved"] = len(moved)
                thr.setdefault(kind, {})[str(t)] = seen[moved]
        results["sweeps"]["threshold"][name] = thr
        ks: dict[str, dict] = {}
        for k in cfg.sweep_k:
            patched, _ = lab.transferred(src_lora, name, settings(cfg, rank=k))
            ks[str(k)] = lab.metrics(name, lab.predict_eps(patched), eps_lora_gt)
        results["sweeps"]["k"][name] = ks
        rs: dict[str, dict] = {}
        for r, handle in [(cfg.rank, src_lorax), *sweep_r_handles.items()]:
            patched, _ = lab.transferred(handle, name, settings(cfg))
            rs[str(r)] = lab.metrics(name, lab.predict_eps(patched), eps_gt)
        results["sweeps"]["r"][name] = rs
        log(f"  seed {seed} {name}: " + ", ".join(f"{a} cos {m['cos']:.3f} task {m['task']:.3f}"
                                                  for a, m in arms.items() if "cos" in m))
    r_source = {str(r): lab.metrics("source", lab.predict_eps(lab.patched(h, "source")), None)
                for r, h in sweep_r_handles.items()}
    r_source[str(cfg.rank)] = results["source"]["LoRA-X"]
    results["sweeps"]["r_on_source"] = r_source
    results["train_seconds"] = train_s
    results["final_loss"] = {"LoRA-X on source": _tail(src_lorax_loss), "LoRA on source": _tail(src_lora_loss),
                             "GT": _tail(gt_loss)}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["phase_seconds"] = {k: round(v, 1) for k, v in lab.seconds.items()}
    results["phase_seconds"]["train"] = round(sum(train_s.values()), 1)
    results["phase_seconds"]["world"] = lab.world_seconds
    del lab
    comfy_host.unload_all()
    return results


def _tail(losses, n: int = 5) -> float:
    return float(sum(losses[-n:]) / min(n, len(losses)))


def _decisions(th) -> dict[str, Any]:
    rows = th.result.layers
    phis = [l.similarity.phi_hat_min for l in rows if l.similarity is not None]
    return {"moved": sum(1 for l in rows if l.delta is not None), "layers": len(rows),
            "phi_hat_min": round(min(phis), 3) if phis else None,
            "phi_hat_median": round(statistics.median(phis), 3) if phis else None}


# --------------------------------------------------------------------------------------
# Aggregation and the printed tables
# --------------------------------------------------------------------------------------


def mean_sd(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values, digits: int = 3) -> str:
    m, s = mean_sd(values)
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


REFERENCE = {arm: ("GT" if arm in LORAX_ARMS else "LoRA GT") for arm in LORAX_ARMS + LORA_ARMS}


def retained(arm: Mapping[str, float], reference: Mapping[str, float]) -> float | None:
    """The share of the ground truth's task-loss reduction an arm keeps: (1 − L_arm)/(1 − L_GT)."""
    gain = 1.0 - reference["task"]
    return (1.0 - arm["task"]) / gain if gain > 0 else None


def _sweep_cell(runs, sweep: str, name: str, kind: str | None, value) -> list[dict]:
    per = []
    for r in runs:
        block = r["sweeps"][sweep][name]
        per.append(block[kind][str(value)] if kind else block[str(value)])
    return per


def summarize(runs: list[dict], cfg: Config) -> dict[str, Any]:
    """Means and spreads over seeds; each sweep's best value (lowest mean task loss) and the shipped one."""
    out: dict[str, Any] = {"table": {}, "sweeps": {}, "distance": {}}
    for name in cfg.targets:
        rows = {}
        for arm in LORAX_ARMS + LORA_ARMS:
            per = [r["targets"][name][arm] for r in runs]
            rows[arm] = {key: mean_sd([p.get(key) for p in per]) for key in ("cos", "rel_err", "task")}
            rows[arm]["retained"] = mean_sd([retained(r["targets"][name][arm], r["targets"][name][REFERENCE[arm]])
                                             for r in runs])
        out["table"][name] = rows
        out["distance"][name] = mean_sd([r["distance"][name] for r in runs])
    shipped = {"threshold LoRA-X": cfg.threshold, "threshold LoRA": cfg.threshold, "k LoRA": cfg.rank,
               "r LoRA-X": cfg.rank}
    sweeps = [("threshold LoRA-X", "threshold", "LoRA-X", cfg.sweep_thresholds),
              ("threshold LoRA", "threshold", "LoRA", cfg.sweep_thresholds),
              ("k LoRA", "k", None, cfg.sweep_k)]
    if cfg.sweep_r:
        sweeps.append(("r LoRA-X", "r", None, tuple(sorted({cfg.rank, *cfg.sweep_r}))))
    for label, sweep, kind, values in sweeps:
        scores = {}
        for v in values:
            cells = {name: _sweep_cell(runs, sweep, name, kind, v) for name in cfg.targets}
            flat = [c for name in cfg.targets for c in cells[name]]
            scores[v] = {"task": statistics.fmean(c["task"] for c in flat),
                         "cos": statistics.fmean(c["cos"] for c in flat),
                         "per_target": {name: {"task": mean_sd([c["task"] for c in cells[name]]),
                                               "moved": cells[name][0].get("moved")} for name in cfg.targets},
                         "pairs": [c["task"] for c in flat]}
        lowest = min(scores[v]["task"] for v in values)
        ties = [v for v in values if scores[v]["task"] <= lowest + 1e-12]
        best = shipped[label] if shipped[label] in ties else ties[0]
        ref = scores.get(shipped[label])
        wins = None if ref is None else sum(a < b - 1e-12 for a, b in zip(scores[best]["pairs"], ref["pairs"]))
        out["sweeps"][label] = {"scores": scores, "best": best, "shipped": shipped[label],
                                "best_beats_shipped": wins, "pairs": len(runs) * len(cfg.targets)}
    return out


def print_report(runs: list[dict], cfg: Config, summary: dict, out=print) -> None:
    n = len(runs)
    out(f"\nFidelity on held-out inputs, mean ± sd over {n} seed{'s' if n > 1 else ''} {list(cfg.seeds)}.")
    out("cos / rel. err: the arm's output change against the ground truth's (LoRA-X arms against GT, LoRA arms "
        "against LoRA GT; GT (retrained) is the noise floor: GT trained again with another seed). task: held-out "
        "task loss relative to the target without adapter (1 = style not learnt, 0 = perfect). kept: the share "
        "of the ground truth's task-loss reduction the arm keeps, (1 − task)/(1 − task of its GT).")
    for name in cfg.targets:
        dm, dsd = summary["distance"][name]
        out(f"\ntarget: {name} (output distance from the source ‖ε_t − ε_s‖/‖ε_s‖ = {dm:.2f} ± {dsd:.2f})")
        out(f"  {'arm':<18} {'cos':>15} {'rel. err':>15} {'task loss':>15} {'kept':>15}")
        for arm in LORAX_ARMS + LORA_ARMS:
            per = [r["targets"][name][arm] for r in runs]
            kept = [retained(r["targets"][name][arm], r["targets"][name][REFERENCE[arm]]) for r in runs]
            cells = [fmt([p.get(k) for p in per]) for k in ("cos", "rel_err", "task")] + [fmt(kept, 2)]
            note = ""
            if arm.endswith("copied"):
                note = f"  ({per[0]['layers']} layers by name)"
            if arm == "LoRA GT":
                note = f"  (cos vs GT {fmt([p['cos_vs_GT'] for p in per])})"
            out(f"  {arm:<18} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {cells[3]:>15}{note}")
        lay = runs[0]["layers"][name]
        out(f"  shipped transfer settings, seed {runs[0]['seed']}: " + "; ".join(
            f"{k}: {v['moved']}/{v['layers']} layers moved, Φ̂ min {v['phi_hat_min']} median {v['phi_hat_median']}"
            for k, v in lay.items()))
    out("\nOn the source itself (capacity): task loss " + ", ".join(
        f"{k} {fmt([r['source'][k]['task'] for r in runs])}" for k in ("LoRA-X", "LoRA")))
    out(f"\nSweeps: mean task loss per target over seeds (layers moved), and over all seeds × targets; best = "
        f"lowest mean (the shipped value on a tie); 'beats shipped' counts the (seed, target) pairs where the best "
        f"value's task loss is lower than the shipped value's.")
    for label, sw in summary["sweeps"].items():
        head = "".join(f"{name:>17}" for name in cfg.targets)
        out(f"  {label}:")
        out(f"    {'value':>8}     {head}{'mean':>9}{'cos':>8}")
        for v, sc in sw["scores"].items():
            cells = ""
            for name in cfg.targets:
                (m, sd), moved = sc["per_target"][name]["task"], sc["per_target"][name]["moved"]
                cell = f"{m:.3f}±{sd:.3f}" + (f" ({moved})" if moved is not None else "")
                cells += f"{cell:>17}"
            tags = [t for t, ok in (("best", v == sw["best"]), ("shipped", v == sw["shipped"])) if ok]
            out(f"    {v!s:>8}     {cells}{sc['task']:>9.3f}{sc['cos']:>8.3f}  {' '.join(tags)}")
        if sw["best_beats_shipped"] is not None and sw["best"] != sw["shipped"]:
            out(f"    best {sw['best']} beats shipped {sw['shipped']} in {sw['best_beats_shipped']} of "
                f"{sw['pairs']} (seed, target) pairs")
    if cfg.sweep_r:
        out("  r LoRA-X on the source itself (task loss): " + ", ".join(
            f"r={r} {fmt([run['sweeps']['r_on_source'][str(r)]['task'] for run in runs])}"
            for r in sorted({cfg.rank, *cfg.sweep_r})))


def calibrate(cfg: Config, lorax_lrs=(0.001, 0.002, 0.004), lora_lrs=(1e-4, 3e-4, 1e-3), out=print) -> dict:
    """Held-out task loss on the source after ``cfg.steps`` steps, per learning rate (how the defaults were set)."""
    comfy_host = host.get_comfy_host()
    comfy_host.load_pack(host.REPO_ROOT)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # a command of its own: nothing to restore
    found: dict[str, dict] = {"LoRA-X": {}, "LoRA": {}}
    for seed in cfg.seeds:
        with torch.inference_mode():  # as ComfyUI runs nodes
            lab = Lab(comfy_host, seed, replace(cfg, targets=()))
            for kind, lrs in (("LoRA-X", lorax_lrs), ("LoRA", lora_lrs)):
                for lr in lrs:
                    if kind == "LoRA-X":
                        lab.cfg = replace(cfg, lorax_lr=lr)
                        handle, _ = lab.train_lorax("source", rank=cfg.rank, arm=1)
                    else:
                        lab.cfg = replace(cfg, lora_lr=lr)
                        handle, _ = lab.train_lora("source", rank=cfg.lora_rank, arm=2)
                    task = lab.metrics("source", lab.predict_eps(lab.patched(handle, "source")), None)["task"]
                    found[kind].setdefault(lr, []).append(task)
                    out(f"  seed {seed} {kind} lr {lr:g}: task loss {task:.3f}")
            del lab
    for kind, per in found.items():
        out(f"{kind}: " + ", ".join(f"lr {lr:g} → {fmt(v)}" for lr, v in per.items()))
    return found


def run(cfg: Config, log: Callable[[str], None] = print, comfy_host=None) -> tuple[list[dict], dict]:
    """All seeds of ``cfg`` on the in-process host; returns the per-seed results and the summary."""
    comfy_host = comfy_host or host.get_comfy_host()
    import comfy.utils  # importable once the host has put the ComfyUI tree on sys.path

    comfy_host.load_pack(host.REPO_ROOT)
    bars, comfy.utils.PROGRESS_BAR_ENABLED = comfy.utils.PROGRESS_BAR_ENABLED, False
    runs = []
    try:
        for seed in cfg.seeds:
            with torch.inference_mode():  # as ComfyUI runs nodes
                runs.append(run_seed(comfy_host, seed, cfg, log=log))
            phases = ", ".join(f"{k} {v:.0f} s" for k, v in runs[-1]["phase_seconds"].items())
            log(f"seed {seed}: {runs[-1]['seconds']:.0f} s ({phases}; load average {load_average()})")
    finally:
        comfy.utils.PROGRESS_BAR_ENABLED = bars
    return runs, summarize(runs, cfg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, the heavy target, short sweeps")
    ap.add_argument("--fast", action="store_true", help="what the test suite runs: --quick on a one-level source")
    ap.add_argument("--seeds", type=str, help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--targets", type=str, help=f"comma-separated, from {','.join(TARGETS)}")
    ap.add_argument("--steps", type=int, help="training steps per arm")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the same floating-point order on every machine, and on a "
                         "shared 2-core machine 3x faster than 2 threads competing with other processes)")
    ap.add_argument("--json", type=str, help="write every figure to this file")
    ap.add_argument("--verbose", action="store_true", help="keep ComfyUI's log output")
    ap.add_argument("--calibrate", action="store_true",
                    help="only train on the sources at a few learning rates and print the held-out task loss")
    args = ap.parse_args(argv)
    if not args.verbose:
        logging.getLogger().setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FAST if args.fast else QUICK if args.quick else Config()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.targets:
        cfg = replace(cfg, targets=tuple(t.strip() for t in args.targets.split(",")))
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    bad = [t for t in cfg.targets if t not in TARGETS]
    if bad:
        ap.error(f"unknown target {bad[0]!r}; expected some of {', '.join(TARGETS)}")
    if args.calibrate:
        calibrate(cfg)
        return 0
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    print(f"fidelity benchmark: seeds {list(cfg.seeds)}, targets {list(cfg.targets)}, {cfg.steps} steps per arm, "
          f"latents {cfg.latent_px}×{cfg.latent_px}, torch threads {torch.get_num_threads()}, "
          f"load average at start {load_average()}")
    runs, summary = run(cfg)
    print_report(runs, cfg, summary)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(f"\ntotal {wall:.0f} s wall, {cpu:.0f} s CPU; load average at the end {load_average()} "
          f"({os.cpu_count()} cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "runs": runs, "summary": summary, "wall_s": wall}, f, indent=1,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
