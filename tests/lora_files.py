"""LoRA state dicts in kohya's naming for the tests: UNet and SD1.x text-encoder keys, and their factors."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from model_builders import SD15_TE_PREFIX, sd15_te_vae_layout


def kohya_lora_prefix(unet_key: str) -> str:
    """``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`` ->
    ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`` (ComfyUI maps this
    kohya-style name onto ``diffusion_model.<key>``)."""
    k = unet_key[: -len(".weight")] if unet_key.endswith(".weight") else unet_key
    return "lora_unet_" + k.replace(".", "_")


def make_kohya_lora(targets: Mapping[str, tuple[Any, Any]], alpha: float | None = None) -> dict[str, Any]:
    """``{unet_key: (up [out, r], down [r, in])}`` -> kohya LoRA state dict with
    ``.lora_up.weight``, ``.lora_down.weight`` and ``.alpha`` (default alpha = rank).
    ComfyUI applies ``up @ down * alpha / rank`` (times the loader strength)."""
    import torch

    lora: dict[str, Any] = {}
    for key, (up, down) in targets.items():
        p = kohya_lora_prefix(key)
        lora[f"{p}.lora_up.weight"] = up.contiguous()
        lora[f"{p}.lora_down.weight"] = down.contiguous()
        lora[f"{p}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    return lora


def te_lora_prefix(layer: int, module: str) -> str:
    """kohya name of an SD1.x text-encoder module, as ``comfy.lora.model_lora_keys_clip`` maps
    it: ``te_lora_prefix(0, "self_attn.q_proj")`` -> ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``
    (-> ``clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight``)."""
    return f"lora_te_text_model_encoder_layers_{layer}_{module.replace('.', '_')}"


def te_clip_key(layer: int, module: str) -> str:
    """The key of that module's weight in ComfyUI's SD1.x CLIP model (``clip.cond_stage_model``)."""
    return f"clip_l.transformer.text_model.encoder.layers.{layer}.{module}.weight"


def make_sd15_lora_with_te(unet_sd: Mapping[str, Any], unet_keys: Sequence[str],
                           te_modules: Sequence[tuple[int, str]], *, rank: int = 4, alpha: float = 2.0,
                           std: float = 0.05, seed: int = 5) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """A kohya LoRA for SD1.5 touching UNet weights and CLIP-L text-encoder modules.

    ``unet_keys``: UNet weight keys (as in ``unet_sd``); ``te_modules``: ``(layer, module)`` pairs
    such as ``(0, "self_attn.q_proj")`` or ``(11, "mlp.fc2")``, written as
    ``lora_te_text_model_encoder_layers_<layer>_<module>`` (:func:`te_lora_prefix`). Factors are
    N(0, std²) of rank ``rank`` (convs: ``down`` ``[r, in, kh, kw]``), alpha as given (ComfyUI
    scales ``up @ down`` by ``alpha / rank``). Returns ``(lora state dict, factors)`` with
    ``factors`` keyed by the UNet key (unprefixed) or the CLIP key (:func:`te_clip_key`).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    factors: dict[str, tuple[Any, Any]] = {}
    for key in unet_keys:
        w = unet_sd[key]
        factors[key] = (torch.randn(w.shape[0], rank, generator=g) * std,
                        (torch.randn(rank, w[0].numel(), generator=g) * std).reshape(rank, *w.shape[1:]))
    lora = make_kohya_lora({k: factors[k] for k in unet_keys}, alpha=alpha)
    te_shapes = sd15_te_vae_layout()["text_encoder"]
    for layer, module in te_modules:
        shape = te_shapes[f"{SD15_TE_PREFIX}transformer.text_model.encoder.layers.{layer}.{module}.weight"]
        up = torch.randn(shape[0], rank, generator=g) * std
        down = torch.randn(rank, shape[1], generator=g) * std
        p = te_lora_prefix(layer, module)
        lora[f"{p}.lora_up.weight"] = up
        lora[f"{p}.lora_down.weight"] = down
        lora[f"{p}.alpha"] = torch.tensor(float(alpha))
        factors[te_clip_key(layer, module)] = (up, down)
    return lora, factors
