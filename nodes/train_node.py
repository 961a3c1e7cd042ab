"""LoRA-X Train: train a LoRA-X adapter (Δσ of the top-r singular values) inside ComfyUI.

The training loop is the host's own: ``comfy_extras.nodes_train.TrainSampler`` driven by a
``Guider_Basic`` over a ``ModelPatcher.clone()`` that carries one weight wrapper per adapted
layer (``add_weight_wrapper``), exactly as the stock *Train LoRA* node does it. What differs:

* the wrapper is :class:`lorax.training.SigmaAdapter` (``w + U diag(Δσ) Vᵀ``, U and V frozen
  from the SVD engine), subclassed here together with the host's ``WeightAdapterTrainBase``;
* with a ``teacher`` MODEL the target of each step is the teacher's x0 prediction at the same
  noisy input (a ``TrainSampler`` subclass overriding ``fwd_bwd``), compared as predicted noise
  ((x0_student − x0_teacher)/σ, see :func:`noise_scale`), which distils a fine-tune, a LoRA'd
  model or anything else with the source's architecture into a LoRA-X adapter;
* the result is handed on as a LoRA-X adapter (``LORAX_ADAPTER``), saved atomically only after
  the whole run succeeded, and the returned MODEL is the source patched with the final Δσ as an
  ordinary low-rank patch (the same patch LoRA-X Load makes from the saved file), so nothing
  downstream needs gradients or the training wrappers.
"""

from __future__ import annotations

import copy
import functools
import os
import time
import warnings

import torch

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths

from lorax.errors import LoraxError
from lorax.lorax_adapter import save_lorax
from lorax.training import FAMILIES, SigmaAdapter, collect_adapter, parameter_count, prepare_layers, select_layers
from lorax.transfer import DEFAULT_RANK

from . import bridge
from .api import CATEGORY, Adapter, io, output
from .handles import AdapterHandle
from .runtime import get_engine
from .save_node import next_free_path

DTYPES = ("auto", "bf16", "fp32")


@functools.lru_cache(maxsize=None)
def host_adapter_class() -> type[SigmaAdapter]:
    """:class:`SigmaAdapter` that also is the host's ``WeightAdapterTrainBase`` (when it has one)."""
    try:
        from comfy.weight_adapter import WeightAdapterTrainBase
    except ImportError:  # an older ComfyUI: the duck-typed adapter works all the same
        return SigmaAdapter

    class HostSigmaAdapter(SigmaAdapter, WeightAdapterTrainBase):
        """``w + U diag(Δσ) Vᵀ``; see :class:`lorax.training.SigmaAdapter` (its methods come first)."""

    return HostSigmaAdapter


def _host_training():
    try:
        import comfy_extras.nodes_custom_sampler as custom_sampler
        import comfy_extras.nodes_train as nodes_train
    except ImportError as e:  # pragma: no cover - every ComfyUI this pack supports has them
        raise LoraxError(f"this ComfyUI has no training support (comfy_extras.nodes_train: {e}); update ComfyUI") from None
    return nodes_train, custom_sampler


class _PatchFunction:
    """A teacher's extra weight patches applied on the fly (for a teacher sharing the source's weights)."""

    def __init__(self, key: str, patches: list):
        self.key = key
        self.patches = patches

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        out = comfy.lora.calculate_weight(self.patches, w.to(torch.float32, copy=True), self.key,
                                          intermediate_dtype=torch.float32)
        return out.to(w.dtype)


class Teacher:
    """The teacher MODEL of a distillation run: its x0 prediction at the student's noisy input.

    A teacher with its own weights (a fine-tune loaded from another file) is loaded beside the
    student. A teacher that shares the source's weights in memory (the source with a LoRA or a
    LoRA-X adapter on top: a ``clone()`` plus patches) cannot be patched in place at the same time
    as the student, so its extra patches are applied on the fly, as weight functions swapped in
    for the teacher's forward pass only.
    """

    def __init__(self, teacher, student):
        self.patcher = teacher
        self.student = student
        if bridge.model_kind(teacher) != bridge.model_kind(student):
            raise LoraxError(f"the teacher is a {bridge.model_kind(teacher)} model but the source is a "
                             f"{bridge.model_kind(student)} model; the teacher must have the source's architecture")
        self.shared = teacher.model is student.model
        self.extra: dict[str, list] = {}
        if self.shared:
            for key in set(teacher.patches) | set(student.patches):
                mine, base = teacher.patches.get(key, []), student.patches.get(key, [])
                if len(mine) < len(base) or any(a is not b for a, b in zip(mine, base)):
                    raise LoraxError("the teacher shares its weights with the source model but is not the source plus "
                                     "further patches; connect the source itself (or load the teacher separately)",
                                     key=key)
                if len(mine) > len(base):
                    self.extra[key] = mine[len(base):]
            if not self.extra and teacher.weight_wrapper_patches == student.weight_wrapper_patches:
                raise LoraxError("the teacher is the source model itself, so there is nothing to learn; connect a "
                                 "fine-tune, or the source with a LoRA, as the teacher (or no teacher at all)")

    def models_to_load(self) -> list:
        return [] if self.shared else [self.patcher]

    def begin(self) -> None:
        if not self.shared:
            self.patcher.pre_run()

    def end(self) -> None:
        if not self.shared:
            self.patcher.cleanup()

    def _ensure_loaded(self) -> None:
        loaded = comfy.model_management.current_loaded_models
        if not any(lm.model is self.patcher for lm in loaded):
            # Evicted to make room (small GPUs): bring both back, fully.
            comfy.model_management.load_models_gpu([self.student, self.patcher], force_full_load=True)
            self.patcher.pre_run()

    def _swapped_functions(self):
        """Context: the shared modules' weight functions set to the teacher's for one forward pass."""
        teacher, student = self.patcher, self.student
        keys = set(self.extra) | set(student.weight_wrapper_patches) | set(teacher.weight_wrapper_patches)
        model = student.model

        class _Swap:
            def __enter__(s):
                s.saved = []
                try:
                    for key in sorted(keys):
                        module_name, attr = key.rsplit(".", 1)
                        module = comfy.utils.get_attr(model, module_name)
                        name = "weight_function" if attr == "weight" else "bias_function"
                        if not hasattr(module, name):
                            raise LoraxError("this layer is not a ComfyUI operation; the teacher's patches cannot be "
                                             "applied on the fly (load the teacher from its own file)", key=key)
                        s.saved.append((module, name, module.__dict__.get(name, _MISSING)))
                        functions = [_PatchFunction(key, self.extra[key])] if key in self.extra else []
                        setattr(module, name, functions + list(teacher.weight_wrapper_patches.get(key, [])))
                except BaseException:
                    s.__exit__(None, None, None)
                    raise
                return s

            def __exit__(s, *exc):
                for module, name, value in reversed(s.saved):
                    if value is _MISSING:
                        module.__dict__.pop(name, None)
                    else:
                        setattr(module, name, value)
                return False

        return _Swap()

    @torch.no_grad()
    def predict(self, model_wrap, xt: torch.Tensor, sigmas: torch.Tensor, extra_args: dict) -> torch.Tensor:
        """The teacher's denoised prediction (x0) for ``xt`` at ``sigmas``, with the student's conditioning."""
        wrap = copy.copy(model_wrap)  # same processed conds; the teacher's model and options
        wrap.model_options = self.patcher.model_options
        options = comfy.model_patcher.create_model_options_clone(self.patcher.model_options)
        sample_sigmas = extra_args.get("model_options", {}).get("transformer_options", {}).get("sample_sigmas")
        if sample_sigmas is not None:
            options.setdefault("transformer_options", {})["sample_sigmas"] = sample_sigmas
        args = dict(extra_args, model_options=options)
        if self.shared:
            with self._swapped_functions():
                return wrap(xt.detach(), sigmas.detach(), **args).float()
        self._ensure_loaded()
        wrap.inner_model = self.patcher.model
        return wrap(xt.detach().to(self.patcher.load_device), sigmas.detach().to(self.patcher.load_device),
                    **args).float().to(xt.device)


_MISSING = object()


class _NormalTensor:
    """Identity weight wrapper. ComfyUI loads weights inside ``torch.inference_mode()``, and autograd
    cannot save such tensors for the backward pass; a module with any weight function gets a fresh
    copy of its weight on every forward (what the stock trainer relies on, as it wraps every layer),
    made here outside inference mode. Added to the layers that carry no Δσ."""

    def __call__(self, w):
        return w


AS_NORMAL_TENSOR = _NormalTensor()


def noise_scale(model_sampling, sigmas: torch.Tensor, dim: int) -> torch.Tensor:
    """σ per sample (at least the schedule's σ_min), shaped to divide an x0 batch of ``dim`` dimensions.

    The distillation loss compares ``(x0_student − x0_teacher) / σ``: the difference of the predicted
    noise ε (x = x0 + σε). Comparing x0 itself (the stock trainer's target) weights a step by σ²,
    which spans five orders of magnitude over an SD schedule, so low-noise steps would teach
    nothing; measured on a planted adapter, the ε form converges several times faster.
    """
    floor = float(getattr(model_sampling, "sigma_min", 1e-3) or 1e-3)
    s = sigmas.detach().float().clamp_min(floor)
    return s.reshape(-1, *([1] * (dim - 1)))


def merged_batch_cond(conds: list) -> list:
    """The conds of one training step as a single cond whose tensors are stacked along the batch.

    ComfyUI's ``TrainSampler`` hands the step's conds over as a list, one per latent; its sampler
    code applies every entry of such a list to the *whole* batch and averages the outputs, so with
    ``batch_size`` b each latent is denoised under the mean of b conditionings, at b² forward passes.
    Stacked into one cond, row i conditions latent i only. Returned unchanged (stock behaviour) when
    the entries differ in anything but their tensors' values, or a tensor is not one row."""
    if len(conds) < 2:
        return conds
    first = conds[0]
    model_conds = first.get("model_conds") if isinstance(first, dict) else None
    if not isinstance(model_conds, dict):
        return conds
    merged = {}
    for key, value in model_conds.items():
        values = [c.get("model_conds", {}).get(key) for c in conds]
        if not all(type(v) is type(value) for v in values):
            return conds
        tensors = [getattr(v, "cond", None) for v in values]
        if not all(isinstance(t, torch.Tensor) and t.shape[0] == 1 for t in tensors):
            return conds
        if not all(value.can_concat(v) for v in values[1:]):
            return conds
        merged[key] = value._copy_with(value.concat(values[1:]))
    if any(set(c) != set(first) or set(c["model_conds"]) != set(model_conds) for c in conds):
        return conds
    out = dict(first)
    out["model_conds"] = merged
    return [out]


@functools.lru_cache(maxsize=None)
def sampler_class():
    """``TrainSampler`` with a teacher target (distillation) and a cancel check every step."""
    nodes_train, _ = _host_training()

    class LoraxTrainSampler(nodes_train.TrainSampler):
        def __init__(self, *args, teacher: Teacher | None = None, merge_conds: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.merge_conds = merge_conds

        def fwd_bwd(self, model_wrap, batch_sigmas, batch_noise, batch_latent, cond, indicies, extra_args,
                    dataset_size, bwd=True):
            comfy.model_management.throw_exception_if_processing_interrupted()
            step_conds = [cond[i] for i in indicies]
            if self.merge_conds:
                step_conds = merged_batch_cond(step_conds)
            if self.teacher is None and len(step_conds) == len(indicies):
                with warnings.catch_warnings():  # the stock step asks CPU autocast for fp32, which it ignores
                    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
                    return super().fwd_bwd(model_wrap, batch_sigmas, batch_noise, batch_latent, cond, indicies,
                                           extra_args, dataset_size, bwd=bwd)
            sampling = model_wrap.inner_model.model_sampling
            xt = sampling.noise_scaling(batch_sigmas, batch_noise, batch_latent, False)
            model_wrap.conds["positive"] = step_conds
            batch_extra_args = nodes_train.make_batch_extra_option_dict(extra_args, indicies, full_size=dataset_size)
            if self.teacher is not None:
                target = self.teacher.predict(model_wrap, xt, batch_sigmas, batch_extra_args)
                scale = noise_scale(sampling, batch_sigmas, target.dim())
            else:  # the stock step's target (the clean latent), with the step's conds merged
                target = sampling.noise_scaling(torch.zeros_like(batch_sigmas), torch.zeros_like(batch_noise),
                                                batch_latent, False).float()
                scale = 1.0
            autocast = self.training_dtype != torch.float32  # fp32: no autocast (and no CPU warning)
            with torch.autocast(xt.device.type, dtype=self.training_dtype, enabled=autocast):
                x0_pred = model_wrap(xt.requires_grad_(True), batch_sigmas.requires_grad_(True), **batch_extra_args)
            loss = self.loss_fn(x0_pred.float() / scale, target / scale)
            if bwd:
                (loss / self.grad_acc).backward()
            return loss

    return LoraxTrainSampler


def training_dtype(choice: str, device) -> torch.dtype:
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float32


def check_save_name(save_name: str) -> str:
    """The save prefix, validated before any training is done ('' = do not save)."""
    name = save_name.strip()
    if name.endswith(".safetensors"):
        name = name[:-len(".safetensors")]
    parts = name.replace("\\", "/").strip("/").split("/")
    if name and (".." in parts or os.path.isabs(name)):
        raise LoraxError(f"save_name {save_name!r} must be a relative name inside the loras folder")
    return name


def _dataset(latents, positive, dtype):
    samples = latents.get("samples") if isinstance(latents, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() < 4 or samples.shape[0] < 1:
        raise LoraxError("latents must be a LATENT batch (e.g. from VAE Encode or Empty Latent Image)")
    if getattr(samples, "is_nested", False):
        raise LoraxError("latents of different sizes are not supported; resize the images to one size")
    samples = samples.to(dtype)
    n = int(samples.shape[0])
    if not isinstance(positive, list) or not positive:
        raise LoraxError("positive must be a CONDITIONING (e.g. from CLIP Text Encode)")
    if len(positive) == 1 and n > 1:
        positive = positive * n
    elif len(positive) != n:
        raise LoraxError(f"the conditioning holds {len(positive)} entries but there are {n} latents; give one "
                         "conditioning for all latents or one per latent")
    return samples, positive, n


class LoraxTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraxTrain",
            display_name="LoRA-X Train",
            category=CATEGORY,
            description=("Trains a LoRA-X adapter on a model: only the top-r singular values of each adapted weight "
                         "change (W + U diag(Δσ) Vᵀ with U, V frozen from the model's own SVD), r numbers per layer, "
                         "starting from zero. Without a teacher it learns to denoise the latents like ComfyUI's Train "
                         "LoRA; with a teacher it learns to reproduce the teacher's predictions (extracts a LoRA-X "
                         "adapter from a fine-tune or a LoRA'd model). Uses ComfyUI's own training loop."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The source model the adapter is trained on (never modified)."),
                io.Latent.Input("latents", tooltip="The training set: a batch of latents (VAE Encode of your "
                                                   "images). With a teacher, Empty Latent Image is enough."),
                io.Conditioning.Input("positive", tooltip="Conditioning for the latents: one for all, or one per "
                                                          "latent."),
                io.Int.Input("batch_size", default=1, min=1, max=10000,
                             tooltip="Latents per step (at most the number of latents)."),
                io.Int.Input("steps", default=100, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=0.002, min=0.0000001, max=10.0, step=0.0000001,
                               tooltip="Adam learning rate for Δσ, in units of singular values (each step moves a "
                                       "Δσ by about this much)."),
                io.Int.Input("rank", default=DEFAULT_RANK, min=1, max=4096,
                             tooltip="r: top singular values trained per layer (capped at each layer's rank)."),
                io.Combo.Input("layers", options=list(FAMILIES), default=FAMILIES[0],
                               tooltip="Which weights get an adapter: attention projections, plus feed-forward "
                                       "layers, plus transformer proj_in/proj_out and convolutions."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed for the noise, noise levels and batches of every step."),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="auto",
                               tooltip="Compute dtype of the model during training: auto = bf16 where the device "
                                       "runs it fast, else fp32. Δσ and its arithmetic stay float32."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in the backward pass: much less memory, about a "
                                         "third slower."),
                io.String.Input("save_name", default="lorax/trained",
                                tooltip="Where to save the adapter inside the loras folder (a counter is added, "
                                        "nothing is overwritten); empty = do not save. Written only after the whole "
                                        "run succeeded."),
                io.Model.Input("teacher", optional=True,
                               tooltip="Distillation: train towards this model's predictions (a fine-tune of the "
                                       "source, or the source with a LoRA) instead of the clean latents; the loss "
                                       "compares the predicted noise. Must have the source's architecture."),
            ],
            outputs=[
                output(io.Model, "model", "The input model with the trained adapter applied (an ordinary low-rank "
                                          "patch on a clone).", id="trained_model"),
                output(Adapter, "adapter", "The trained LoRA-X adapter, for LoRA-X Transfer (also saved when "
                                           "save_name is set)."),
                output(io.LossMap, "loss_map", "The loss of every step, for the Plot Loss Graph node."),
                output(io.String, "report", "Layers, trained parameters (Σ r), losses, time and the saved file."),
            ],
        )

    @classmethod
    def execute(cls, model, latents, positive, batch_size, steps, learning_rate, rank, layers, seed,
                training_dtype, gradient_checkpointing, save_name, teacher=None) -> io.NodeOutput:
        out_model, handle, losses, report = train_lorax(
            model, latents, positive, batch_size=batch_size, steps=steps, learning_rate=learning_rate, rank=rank,
            family=layers, seed=seed, dtype_choice=training_dtype, gradient_checkpointing=gradient_checkpointing,
            save_name=save_name, teacher=teacher)
        return io.NodeOutput(out_model, handle, {"loss": losses}, report, ui={"text": [report]})


def _remove_wrappers(patcher, wrappers) -> None:
    """Take this run's weight wrappers off the (shared) modules, whatever state loading left them in."""
    ids = {id(w) for w in wrappers} | {id(AS_NORMAL_TENSOR)}
    for module in patcher.model.modules():
        for name in ("weight_function", "bias_function"):
            functions = module.__dict__.get(name)
            if functions:
                setattr(module, name, [f for f in functions if id(f) not in ids])


def train_weight_wrappers(model, build, latents, positive, *, batch_size, steps, learning_rate, seed, dtype,
                          gradient_checkpointing=True, teacher=None, merge_conds=False):
    """ComfyUI's own training loop over trainable weight wrappers on a clone of ``model``.

    ``build()`` is called with autograd enabled and the RNG seeded from ``seed`` (so random
    initialisations are reproducible) and returns ``(wrappers, parameters, extra)``: ``{model key:
    weight wrapper}`` (e.g. a :class:`SigmaAdapter`, or the host's own ``LoRAAdapter.create_train``
    modules), the tensors Adam trains, and anything the caller wants back. The loop is the stock
    trainer's (``TrainSampler`` + ``Guider_Basic``; with a ``teacher`` MODEL the target is its
    prediction, see :class:`Teacher`). Returns ``(extra, losses)``; the wrappers are taken off the
    modules again and their parameters frozen. ``model`` is never modified. LoRA-X Train is this
    loop with Δσ wrappers; ``bench/fidelity.py`` runs ordinary LoRAs through it too.
    ``merge_conds``: stack each step's per-latent conds into one batched cond (see
    :func:`merged_batch_cond`); off by default, which is the stock trainer's behaviour.
    """
    nodes_train, custom_sampler = _host_training()
    if steps < 1 or batch_size < 1:
        raise LoraxError("steps and batch_size must be at least 1")
    if not (learning_rate > 0):
        raise LoraxError(f"learning_rate must be positive, got {learning_rate}")
    guide = Teacher(teacher, model) if teacher is not None else None  # checked before any work is done
    losses: list[float] = []
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples, positive, n_latents = _dataset(latents, positive, dtype)
        wrappers, parameters, extra = build()
        mp = model.clone()
        mp.set_model_compute_dtype(dtype)
        for key, wrapper in wrappers.items():
            mp.add_weight_wrapper(key, wrapper)
        for name, module in mp.model.named_modules():
            for attr in ("weight", "bias"):
                t = getattr(module, attr, None) if hasattr(module, attr + "_function") else None
                if isinstance(t, torch.Tensor) and t.is_inference() and f"{name}.{attr}" not in wrappers:
                    mp.add_weight_wrapper(f"{name}.{attr}", AS_NORMAL_TENSOR)
        if guide is not None:
            guide.student = mp  # the clone that carries the wrappers (same weights and patches as model)
        optimizer = torch.optim.Adam(list(parameters), lr=learning_rate)
        sampler = sampler_class()(torch.nn.MSELoss(), optimizer, loss_callback=losses.append,
                                  batch_size=batch_size, grad_acc=1, total_steps=steps, seed=seed,
                                  training_dtype=dtype, real_dataset=None, teacher=guide, merge_conds=merge_conds)
        try:
            if gradient_checkpointing:
                for m in nodes_train.find_all_highest_child_module_with_forward(mp.model.diffusion_model):
                    nodes_train.patch(m)
            mp.model.requires_grad_(False)
            comfy.model_management.load_models_gpu([mp] + (guide.models_to_load() if guide else []),
                                                   memory_required=1e20, force_full_load=True)
            if guide is not None:
                guide.begin()
            guider = custom_sampler.Guider_Basic(mp)
            guider.set_conds(positive)
            noise = custom_sampler.Noise_RandomNoise(seed)
            guider.sample(noise.generate_noise({"samples": samples}), samples, sampler,
                          torch.arange(n_latents), seed=noise.seed)
        finally:
            for m in mp.model.modules():
                nodes_train.unpatch(m)
            _remove_wrappers(mp, wrappers.values())
            if guide is not None:
                guide.end()
        del sampler, optimizer
        for wrapper in wrappers.values():
            wrapper.requires_grad_(False)
    if not losses or not all(torch.isfinite(torch.tensor(losses))):
        raise LoraxError("training diverged (the loss became NaN or inf); lower the learning rate")
    return extra, losses


def train_lorax(model, latents, positive, *, batch_size, steps, learning_rate, rank, family, seed,
                dtype_choice="auto", gradient_checkpointing=True, save_name="", teacher=None, engine=None,
                merge_conds=False):
    """The node's work: ``(patched model, AdapterHandle, losses, report)``."""
    prefix = check_save_name(save_name)
    engine = engine or get_engine()
    dtype = training_dtype(dtype_choice, model.load_device)
    t0 = time.perf_counter()

    weights = bridge.PatcherWeights(model)
    names = bridge.kohya_names(bridge.unet_key_map(model), internal=True)
    shapes = {k: weights.shape(k) for k in weights.keys() if k in names}
    keys = select_layers(shapes, family)
    if not keys:
        raise LoraxError(f"the {bridge.model_kind(model)} model has no layers of the family '{family}'")

    def build():
        trained = prepare_layers({k: weights.weight(k) for k in keys}, names, rank, engine,
                                 adapter_class=host_adapter_class())
        return {layer.key: layer.adapter for layer in trained}, [layer.adapter.sigma for layer in trained], trained

    trained, losses = train_weight_wrappers(model, build, latents, positive, batch_size=batch_size, steps=steps,
                                            learning_rate=learning_rate, seed=seed, dtype=dtype,
                                            gradient_checkpointing=gradient_checkpointing, teacher=teacher,
                                            merge_conds=merge_conds)
    n_latents = int(latents["samples"].shape[0])
    version, _ = bridge.base_model_names(model)
    with torch.inference_mode(False):
        adapter = collect_adapter(trained, metadata={
            "lorax_source": bridge.model_kind(model), "ss_base_model_version": version,
            "lorax_training": "distillation" if teacher is not None else "denoising",
            "lorax_steps": str(steps), "lorax_learning_rate": repr(float(learning_rate)),
            "lorax_layer_family": family})
    seconds = time.perf_counter() - t0

    saved_name, size = None, None
    if prefix:
        folder = folder_paths.get_folder_paths("loras")[0]
        path = next_free_path(folder, prefix)
        save_lorax(path, adapter)
        saved_name, size = os.path.relpath(path, folder).replace(os.sep, "/"), os.path.getsize(path)
        adapter.path = path
        handle = AdapterHandle(name=saved_name, path=path, kind="lorax", content=adapter)
    else:
        handle = AdapterHandle(name="trained (not saved)", path="", kind="lorax", content=adapter)

    deltas = bridge.lorax_adapter_deltas(adapter, model, engine)
    out_model = bridge.patched_clone(model, deltas.deltas, 1.0)
    report = training_report(trained, losses, family=family, rank=rank, steps=steps, batch_size=batch_size,
                             learning_rate=learning_rate, dtype=dtype, n_latents=n_latents,
                             distilled=teacher is not None, seconds=seconds, saved_name=saved_name, size=size)
    return out_model, handle, losses, report


def training_report(trained, losses, *, family, rank, steps, batch_size, learning_rate, dtype, n_latents,
                    distilled, seconds, saved_name, size) -> str:
    params = parameter_count(trained)
    ranks = sorted({layer.rank for layer in trained})
    k = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    r_text = f"r = {ranks[0]}" if len(ranks) == 1 else f"r = {ranks[0]}…{ranks[-1]} (requested {rank})"
    lines = [
        f"LoRA-X Train: {len(trained)} layers ({family}), {r_text}",
        f"trained parameters: {params} (Σ r over layers)",
        f"target: {'the teacher model (distillation)' if distilled else 'the clean latents (denoising)'}; "
        f"{n_latents} latents, batch {batch_size}, {steps} steps, Adam lr {learning_rate:g}, "
        f"{str(dtype).replace('torch.', '')}",
        f"loss: {first:.4g} (mean of the first {k} steps) -> {last:.4g} (last {k}), "
        f"factor {first / last:.3g}" if last > 0 else f"loss: {first:.4g} -> {last:.4g}",
        f"time: {seconds:.1f} s ({seconds / max(1, steps):.3f} s/step)",
    ]
    if saved_name is not None:
        lines.append(f"saved to loras/{saved_name} ({size} bytes)")
    else:
        lines.append("not saved (save_name is empty)")
    return "\n".join(lines)
