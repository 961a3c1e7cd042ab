"""LoRA-X Save: write a transferred adapter as a standard kohya LoRA into ComfyUI's 'loras' folder."""

from __future__ import annotations

import os

import folder_paths

from lorax.errors import LoraxError
from .handles import TransferHandle
from .transfer_job import save_transfer

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
        folder = folder_paths.get_folder_paths("loras")[0]
        path = next_free_path(folder, filename_prefix)
        count = save_transfer(transfer, path, bake_strength=bake_strength)
        message = f"Saved {count} layers to loras/{os.path.relpath(path, folder)}"
        return {"ui": {"text": [message]}, "result": (path,)}
