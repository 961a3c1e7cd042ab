"""The bridge between ComfyUI's objects and the pure ``lorax`` library.

Everything that knows about the host lives here: reading base weights out of a
``ModelPatcher``, mapping adapter keys with the host's own key maps
(``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``), parsing every LoRA format with
``comfy.lora.load_lora`` and turning the resulting weight-adapter objects into
:class:`lorax.Delta`, and patching results back as low-rank LoRA patches on a clone.

Conversions, and why they are exact:

* plain LoRA (``up``, ``down``, optional alpha): factored, scaled by ``alpha / rank`` exactly as
  ``LoRAAdapter.calculate_weight`` scales it (no alpha → 1; an rsLoRA-style alpha is stored
  pre-scaled in the file, so the same rule is right).
* everything else — LoCon with ``lora_mid``, DoRA, LoHa, LoKr, OFT/BOFT/GLoRA, ``diff`` patches —
  is materialised by the host itself: ``adapter.calculate_weight(W₀, …)`` in float64 minus
  ``W₀``. For DoRA that is ``m ⊙ (W₀+BA)/‖W₀+BA‖ − W₀`` on the *source* weight, so the
  magnitude vector, which is the norm of the source, never reaches the target.

Where the host's key map sends a module to part of a weight — ``(key, (dim, offset, size))``, e.g.
a diffusers ``to_q`` onto the first third of Flux's fused ``img_attn.qkv`` — the delta is that of
the slice, keyed by its slice key (:mod:`lorax.fused`), and it is patched back into the same rows.
Where the map adds a function (``(key, None, fn)``: SD3's ``swap_scale_shift`` of the last
block's modulation), the host applies it while materialising, so the delta is in the model's own
layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_patcher
import comfy.utils
import comfy.weight_adapter as weight_adapter

from lorax.delta import Delta
from lorax.devices import float64_device
from lorax.errors import LoraxError
from lorax.fingerprint import weight_digest
from lorax.fused import WeightSlice, base_key, host_key, with_slices
from lorax.lorax_adapter import LoraxAdapter
from lorax.verdict import Verdict, guess_architecture
from lorax.weight_formats import dense_weight, is_gguf, logical_shape

log = logging.getLogger("lorax")

#: kohya / modelspec names of the host's model classes, for the metadata of exported files.
BASE_MODEL_NAMES: dict[str, tuple[str, str]] = {
    "SD15": ("sd_v1", "stable-diffusion-v1/lora"),
    "SD20": ("sd_v2", "stable-diffusion-v2/lora"),
    "SD21UnclipL": ("sd_v2", "stable-diffusion-v2/lora"),
    "SDXL": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "SSD1B": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "Segmind_Vega": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "SD3": ("sd3", "stable-diffusion-3-medium/lora"),
    "Flux": ("flux1", "flux-1-dev/lora"),
    "FluxSchnell": ("flux1", "flux-1-schnell/lora"),
}


def model_kind(patcher) -> str:
    """The host's name for the model's configuration class (``SD15``, ``SDXL``, ``Flux``…)."""
    return type(patcher.model.model_config).__name__


def base_model_names(patcher) -> tuple[str, str]:
    kind = model_kind(patcher)
    return BASE_MODEL_NAMES.get(kind, (kind.lower(), f"{kind.lower()}/lora"))


class PatcherWeights:
    """A :class:`lorax.transfer.WeightSource` over the *unpatched* weights of a ModelPatcher.

    While a model sits patched in memory its parameters hold patched values and the originals
    are in ``patcher.backup``; those originals are what the SVD must see. ComfyUI-GGUF keeps its
    patches on the quantized tensor instead, which is then still the original.

    Every weight is handed out through :func:`lorax.weight_formats.dense_weight`: quantized
    layers (ComfyUI's ``QuantizedTensor`` of any layout, legacy scaled fp8, GGUF) as the matrix
    the model computes with, one layer at a time, and never as a tensor that requires grad.
    Shapes are the logical ones (a GGUF tensor's storage shape is its packed bytes').
    """

    def __init__(self, patcher, prefix: str = ""):
        self.patcher = patcher
        self.model = patcher.model if hasattr(patcher, "model") else patcher
        self._shapes: dict[str, tuple[int, ...]] = {}
        for key, value in self.model.state_dict().items():
            if not key.startswith(prefix) or not isinstance(value, torch.Tensor):
                continue
            try:
                live = comfy.utils.get_attr(self.model, key)
            except AttributeError:  # a key only the state dict has (ComfyUI-GGUF's memory estimate)
                continue
            self._shapes[key] = logical_shape(live if isinstance(live, torch.Tensor) else value)

    def keys(self):
        return self._shapes.keys()

    def shape(self, key: str):
        return self._shapes.get(key)

    def stored(self, key: str) -> torch.Tensor:
        """The unpatched weight as the model stores it (possibly quantized)."""
        if key not in self._shapes:
            raise KeyError(key)
        weight, _, _ = comfy.model_patcher.get_key_weight(self.model, key)
        backup = getattr(self.patcher, "backup", {}).get(key)
        return backup.weight if backup is not None else weight

    def weight(self, key: str) -> torch.Tensor:
        weight = self.stored(key)
        _, _, convert = comfy.model_patcher.get_key_weight(self.model, key)
        if convert is not None and not is_gguf(weight):
            # The host's own dequantization for its layer types (legacy scaled fp8: × scale_weight;
            # QuantizedTensor: its layout's dequantize).
            with torch.no_grad():
                weight = convert(weight, inplace=False)
        # A plain weight comes back as a detached view of the live parameter (no copy); its
        # identity lets the digest memo of lorax.fingerprint skip re-hashing it on every run.
        return dense_weight(weight, key=key)

    @property
    def origin(self) -> str:
        """Which model this is, for the SVD cache's listing by model: the file the command line
        loaded; in ComfyUI, which does not tell a node the file, the model's kind and a content id
        (the digest of its first weight, sorted by key: cheap, and different for different models)."""
        path = getattr(self.patcher, "lorax_origin", None)
        if path:
            return path
        if not hasattr(self, "_origin"):
            keys = sorted(k for k, shape in self._shapes.items() if len(shape) >= 2)
            tag = weight_digest(self.weight(keys[0]))[:8] if keys else "empty"
            kind = type(getattr(self.model, "model_config", self.model)).__name__  # SDXL, Flux… or the CLIP class
            self._origin = f"{kind} {tag} (loaded in ComfyUI)"
        return self._origin


def unet_key_map(patcher) -> dict[str, str]:
    """LoRA module name → model key, as the host's LoRA loader maps them."""
    return comfy.lora.model_lora_keys_unet(patcher.model, {})


def adapter_key_map(patcher, clip=None) -> dict[str, Any]:
    """The host's key map for the diffusion model, plus the text encoder's when ``clip`` is given."""
    key_map = unet_key_map(patcher)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def kohya_names(key_map: Mapping[str, Any], prefixes: tuple[str, ...] = ("lora_unet_", "lora_te"),
                internal: bool = False) -> dict[str, str]:
    """Model key → the kohya module name to write for it.

    By default prefers kohya's own (diffusers-derived) naming, which kohya sd-scripts, A1111 and
    Forge all read, for exported LoRAs; ``internal=True`` prefers the host-internal name
    (``lora_unet_`` + the model key with dots as underscores), which ComfyUI reads, Flux-era
    trainers write, and LoRA-X files use.
    """
    out: dict[str, str] = {}
    for name, target in key_map.items():
        if not isinstance(target, str) or not name.startswith(prefixes):
            continue
        own = "lora_unet_" + target[len("diffusion_model."):-len(".weight")].replace(".", "_")

        def preferred(candidate: str) -> bool:
            return (candidate == own) if internal else (candidate != own)

        if target not in out or (preferred(name) and not preferred(out[target])):
            out[target] = name
    return out


def slice_module_names(key_map: Mapping[str, Any]) -> dict[str, str]:
    """Slice key → the adapter module name the host maps onto that slice (diffusers'
    ``transformer.…`` names first), for files that name slices (LoRA-X adapters of split q/k/v)."""
    out: dict[str, str] = {}
    for name, target in sorted(key_map.items(), key=lambda kv: (not kv[0].startswith("transformer."), kv[0])):
        if isinstance(target, tuple) and len(target) >= 2 and target[1] is not None:
            out.setdefault(WeightSlice(target[0], *target[1]).name, name)
    return out


def host_target(target) -> tuple[str, tuple[int, int, int] | None, Callable | None]:
    """``(weight key, (dim, offset, size) or None, function or None)`` of a key-map target."""
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1], target[2] if len(target) > 2 else None


@dataclass
class AdapterDeltas:
    """An adapter read against one model: deltas by model key (or slice key), and what did not map."""

    deltas: dict[str, Delta]
    adapter_ranks: dict[str, int] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)      # adapter module names matching no model key
    unsupported: dict[str, str] = field(default_factory=dict)  # model key → why it cannot be used
    modules: int = 0                                       # modules the adapter has, mapped or not


def _adapter_module_names(lora: Mapping[str, torch.Tensor]) -> set[str]:
    suffixes = (".lora_up.weight", ".lora_down.weight", ".lora_B.weight", ".lora_A.weight", ".alpha",
                ".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".diff", ".lora.up.weight", "_lora.up.weight",
                ".dora_scale", ".lora_mid.weight", ".diff_b", ".lorax_sigma")
    names = set()
    for key in lora:
        for s in suffixes:
            if key.endswith(s):
                names.add(key[:-len(s)])
                break
        else:
            names.add(key.rsplit(".", 1)[0])
    return names


def lora_factors(adapter, key: str, weight: torch.Tensor) -> Delta | None:
    """A plain LoRA as factors with the host's scale, or None when it needs materialising."""
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    rank = down.shape[0]
    m, n = weight.shape[0], weight[0].numel()
    up2, down2 = up.reshape(up.shape[0], -1), down.reshape(rank, -1)
    if up2.shape != (m, rank) or down2.shape != (rank, n):
        raise LoraxError(f"LoRA factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit the model's weight "
                         f"of shape {tuple(weight.shape)}; the adapter was made for another architecture",
                         key=key)
    scale = (float(alpha) / rank) if alpha is not None else 1.0
    return Delta.factored(tuple(weight.shape), up2.double() * scale, down2.double())


def _materialise(patch, key: str, weight: torch.Tensor, function: Callable | None = None) -> Delta:
    """Let the host apply the patch at strength 1 to W₀ (float64) and keep the difference
    (``function``: what the key map applies to the change, e.g. SD3's ``swap_scale_shift``)."""
    weight = weight.to(float64_device(weight.device))  # MPS and DirectML have no float64
    base = (weight.float() if weight.element_size() == 1 else weight).double().clone()
    function = function or (lambda a: a)
    if isinstance(patch, weight_adapter.WeightAdapterBase):
        out = patch.calculate_weight(base.clone(), key, 1.0, 1.0, None, function, torch.float64, None)
    else:
        kind, values = (patch[0], patch[1]) if len(patch) == 2 and isinstance(patch[0], str) else ("diff", patch)
        if kind != "diff":
            raise LoraxError(f"patch type '{kind}' cannot be transferred (it replaces the weight instead of "
                             "changing it)", key=key)
        diff = values[0]
        if tuple(diff.shape) != tuple(weight.shape):
            raise LoraxError(f"diff of shape {tuple(diff.shape)} does not fit the model's weight of shape "
                             f"{tuple(weight.shape)}", key=key)
        out = base + function(diff.double())
    if out is None or tuple(out.shape) != tuple(weight.shape):
        raise LoraxError(f"the host could not apply this adapter to a weight of shape {tuple(weight.shape)}; "
                         "it was made for another architecture", key=key)
    return Delta.from_dense(out - base)


def host_patches(lora: Mapping[str, torch.Tensor], patcher, *, path: str | None = None,
                 clip=None) -> tuple[dict, list[str], int]:
    """The host's own parse of an adapter file: ``(patches by model key, unmapped module names,
    number of modules)``.

    Exactly what ComfyUI's LoRA loaders do (``convert_lora`` → key maps → ``load_lora``), with
    one sentence — the compatibility verdict, naming what the adapter looks made for — instead
    of a warning per key when nothing matches.
    """
    key_map = adapter_key_map(patcher, clip)
    converted = comfy.lora_convert.convert_lora(dict(lora))
    patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    modules = _adapter_module_names(converted)
    own = set(patcher.model.state_dict())
    if clip is not None:
        own |= set(clip.cond_stage_model.state_dict())
    if not any(host_target(t)[0] in own for t in patches):
        raise no_fit_error(model_kind(patcher), len(modules), converted, path=path)
    return patches, sorted(modules - set(key_map)), len(modules)


def no_fit_error(target_kind: str, modules: int, tensors: Mapping[str, torch.Tensor] | None = None, *,
                 path: str | None = None) -> LoraxError:
    """The error for an adapter none of whose modules names a layer of the model: the verdict."""
    return LoraxError(Verdict(target=target_kind, modules=modules, mapped=0,
                              architecture=guess_architecture(tensors or {})).line(), path=path)


def host_patched_clone(patcher, lora: Mapping[str, torch.Tensor], strength: float, *, path: str | None = None):
    """A clone patched with the host's own adapter objects (what LoraLoaderModelOnly does)."""
    patches, unmapped, _ = host_patches(lora, patcher, path=path)
    clone = patcher.clone()
    clone.add_patches(patches, strength)
    if unmapped:
        log.info("LoRA-X: %d adapter modules have no layer in this model (first: %s)", len(unmapped), unmapped[0])
    return clone


def adapter_layers(lora: Mapping[str, torch.Tensor], patcher, *, path: str | None = None, clip=None):
    """The host's parse of an adapter file, mapped onto ``patcher`` (and ``clip``) layer by layer.

    Returns an ``AdapterDeltas`` with only ``unmapped`` and ``unsupported`` filled, and an iterator
    of ``(name, shape, weights, function, patch)`` for every matrix-shaped layer the adapter touches;
    the caller fills ``deltas`` (a transfer materialises them, a scan only checks shapes).
    """
    patches, unmapped, modules = host_patches(lora, patcher, path=path, clip=clip)
    result = AdapterDeltas(deltas={}, unmapped=unmapped, modules=modules)
    unet = with_slices(PatcherWeights(patcher))
    clip_weights = with_slices(PatcherWeights(clip.patcher)) if clip is not None else None

    def layers():
        for target, patch in patches.items():
            key, offset, function = host_target(target)
            source = unet if unet.shape(key) is not None else clip_weights
            if source is None or source.shape(key) is None:
                result.unmapped.append(key)
                continue
            name = key if offset is None else WeightSlice(key, *offset).name
            shape = source.shape(name)
            if shape is None:
                result.unsupported[name] = f"the slice lies outside the weight of shape {source.shape(key)}"
                continue
            if len(shape) < 2:
                result.unsupported[name] = "bias or norm: no singular subspace"
                continue
            yield name, shape, source, function, patch

    return result, layers()


def ordinary_adapter_deltas(lora: Mapping[str, torch.Tensor], patcher, *, path: str | None = None,
                            clip=None) -> AdapterDeltas:
    """Deltas of an ordinary adapter file (any format the host loads) against ``patcher``'s weights.

    Keys for the text encoder are mapped when ``clip`` is given and come back with the host's
    ``clip``-side keys; without it they are listed in ``unmapped``.
    """
    result, layers = adapter_layers(lora, patcher, path=path, clip=clip)
    for name, _shape, source, function, patch in layers:
        weight = source.weight(name)
        try:
            delta = None
            if function is None and getattr(patch, "name", None) == "lora":
                delta = lora_factors(patch, name, weight)
            if delta is None:
                delta = _materialise(patch, name, weight, function)
        except LoraxError as e:
            raise LoraxError(e.detail, path=path, key=name) from None
        result.deltas[name] = delta
    return result


def lorax_adapter_deltas(adapter: LoraxAdapter, patcher, engine, *, clip=None,
                         progress: Callable[[int, int], None] | None = None) -> AdapterDeltas:
    """``U_s,r diag(Δσ) V_s,rᵀ`` for every layer of a LoRA-X adapter, from ``patcher``'s weights.

    Checks first that ``patcher`` is the adapter's source (weight sketches) and that every layer
    exists, so a wrong model fails before any SVD is run.
    """
    key_map = adapter_key_map(patcher, clip)
    unet = with_slices(PatcherWeights(patcher))
    clip_weights = with_slices(PatcherWeights(clip.patcher)) if clip is not None else None
    result = AdapterDeltas(deltas={}, modules=len(adapter.sigmas))
    plan = []
    for module in adapter.sigmas:
        target = key_map.get(module)
        source = None
        if target is not None:
            key, offset, _ = host_target(target)
            target = key if offset is None else WeightSlice(key, *offset).name
            source = unet if unet.shape(key) is not None else clip_weights
        if source is None or source.shape(target) is None:
            result.unmapped.append(module)
            continue
        weight = source.weight(target)
        adapter.check_source(module, weight)
        plan.append((module, target, source, weight))
    if not plan:
        raise no_fit_error(model_kind(patcher), len(adapter.sigmas), dict.fromkeys(adapter.sigmas, torch.empty(0)),
                           path=adapter.path)
    # Named by model (as a transfer names its requests), for the cache's listing and the engine's holds.
    factors = engine.factors_many([(w, int(adapter.sigmas[m].numel())) for m, _, _, w in plan],
                                  origins=[source.origin for _, _, source, _ in plan])
    for (module, target, _, weight), f in zip(plan, factors):
        result.deltas[target] = adapter.delta(module, f, tuple(weight.shape))
        result.adapter_ranks[target] = int(adapter.sigmas[module].numel())
    return result


def lora_patch(delta: Delta):
    """A host LoRA patch (low-rank, alpha 1) for a delta; dense deltas become ``diff`` patches."""
    if delta.is_factored:
        up = delta.up.float().contiguous()
        down = delta.down.float().contiguous()
        return weight_adapter.LoRAAdapter(set(), (up, down, None, None, None, None))
    return ("diff", (delta.weight().float().contiguous(),))


def patched_clone(patcher, deltas: Mapping[str, Delta], strength: float):
    """``patcher.clone()`` with every delta added as a patch; the input is never touched. A slice
    key's delta goes into its rows only (the host's ``(key, (dim, offset, size))`` patch key)."""
    clone = patcher.clone()
    patches = {host_key(key): lora_patch(d) for key, d in deltas.items()}
    applied = set(clone.add_patches(patches, strength))
    missing = [k for k in patches if k not in applied]
    if missing:
        raise LoraxError(f"{len(missing)} patched keys do not exist in the model (first: {missing[0]})")
    return clone


def split_by_owner(deltas: Mapping[str, Delta], patcher) -> tuple[dict[str, Delta], dict[str, Delta]]:
    """Deltas for the diffusion model and for the text encoder (keys the model does not have)."""
    own = set(patcher.model.state_dict().keys())
    model_part = {k: d for k, d in deltas.items() if base_key(k) in own}
    rest = {k: d for k, d in deltas.items() if base_key(k) not in own}
    return model_part, rest


def load_adapter_file(path: str):
    """A LoRA-X adapter or an ordinary adapter's tensors, validated (kind, object): the container
    and the factor pairs before any tensor is read (:mod:`lorax.adapter_check`), so a damaged file
    gets one sentence naming it, never the loader's own exception."""
    from lorax.adapter_check import check_adapter_file, check_lora_factors
    from lorax.lorax_adapter import is_lorax_file, load_lorax
    from lorax.safetensors_io import ensure_finite, is_pickle_name

    check_adapter_file(path)
    if not is_pickle_name(path) and is_lorax_file(path):
        return "lorax", load_lorax(path)
    try:
        tensors = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:  # torch's unpickler and the safetensors binding raise their own types
        what = "a PyTorch file" if is_pickle_name(path) else "safetensors"
        raise LoraxError(f"cannot be read as {what} ({type(e).__name__}: {e}); the file is damaged or of "
                         "another kind, download or export it again", path=path) from None
    ensure_finite(tensors, path)
    if not tensors:
        raise LoraxError("the adapter file holds no tensors", path=path)
    check_lora_factors({k: tuple(t.shape) for k, t in tensors.items()}, path)
    return "lora", tensors
