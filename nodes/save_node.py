"""LoRA-X Save: write a transferred adapter as a standard kohya LoRA into ComfyUI's 'loras' folder."""

from __future__ import annotations

import os

import folder_paths

from lorax.errors import LoraxError
from lorax.kohya_export import save_kohya_lora

from .handles import TransferHandle

CATEGORY = "loaders/LoRA-X"


def next_free_path(folder: str, prefix: str) -> str:
    """``<folder>/<prefix>_00001.safetensors``, the first number not taken (never overwrites)."""
    prefix = prefix.strip().replace("\\", "/").strip("/")
    if not prefix or ".." in prefix.split("/"):
        raise LoraxError(f"filename prefix {prefix!r} must be a relative name inside the loras folder")
    base = os.path.join(folder, prefix)
    os.makedirs(os.path.dirname(base) or folder, exist_ok=True)
    n = 1
    while os.path.exists(f"{base}_{n:05d}.safetensors"):
        n += 1
    return f"{base}_{n:05d}.safetensors"


class LoraxSave:
    DESCRIPTION = ("Saves a transferred adapter as a standard kohya LoRA file (lora_down / lora_up / alpha) that "
                   "ComfyUI's LoraLoader, A1111 and Forge load unchanged, with the target's base-model metadata.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the file was written.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "transfer": ("LORAX_TRANSFER", {"tooltip": "From LoRA-X Transfer."}),
            "filename_prefix": ("STRING", {"default": "lorax/transferred",
                                           "tooltip": "Name inside ComfyUI's loras folder; a counter is added."}),
            "bake_strength": ("BOOLEAN", {"default": True,
                                          "tooltip": "Scale the saved LoRA by the transfer's strength, so loading it "
                                                     "at 1.0 gives what the Transfer node showed."}),
        }}

    def save(self, transfer: TransferHandle, filename_prefix, bake_strength):
        scale = transfer.strength if bake_strength else 1.0
        results = [transfer.result] + ([transfer.clip_result] if transfer.clip_result is not None else [])
        deltas = {}
        for res in results:
            for key, delta in res.deltas.items():
                name = transfer.kohya_names.get(key)
                if name is None:
                    raise LoraxError("no kohya module name for this model key; the target's key map lacks it", key=key)
                deltas[name] = delta.scaled(scale)
        path = next_free_path(folder_paths.get_folder_paths("loras")[0], filename_prefix)
        counts = transfer.result.counts()
        provenance = {
            "tool": "LoRA-X for ComfyUI", "source_adapter": transfer.adapter.name,
            "adapter_kind": transfer.adapter.kind, "target_model": transfer.target_kind,
            "rank": transfer.result.settings.rank, "threshold": transfer.result.settings.threshold,
            "mode": transfer.result.settings.mode, "strength_baked": scale, "layers": counts,
            "text_encoder_skipped": len(transfer.skipped_text_encoder),
        }
        save_kohya_lora(path, deltas, base_model_version=transfer.base_model_version,
                        architecture=transfer.architecture, provenance=provenance)
        rel = os.path.relpath(path, folder_paths.get_folder_paths("loras")[0])
        message = f"Saved {len(deltas)} layers to loras/{rel}"
        return {"ui": {"text": [message]}, "result": (path,)}
