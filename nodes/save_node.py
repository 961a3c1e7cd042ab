"""LoRA-X Save: write a transferred adapter as a standard kohya LoRA into ComfyUI's 'loras' folder."""

from __future__ import annotations

import os

import folder_paths

from lorax.errors import LoraxError
from .api import CATEGORY, Transfer, io, output
from .handles import TransferHandle
from .transfer_job import save_transfer

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


class LoraxSave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraxSave",
            display_name="LoRA-X Save",
            category=CATEGORY,
            description=("Saves a transferred adapter as a standard kohya LoRA file (lora_down / lora_up / alpha) "
                         "that ComfyUI's LoraLoader, A1111 and Forge load unchanged, with the target's base-model "
                         "metadata."),
            is_output_node=True,
            inputs=[
                Transfer.Input("transfer", tooltip="From LoRA-X Transfer."),
                io.String.Input("filename_prefix", default="lorax/transferred",
                                tooltip="Name inside ComfyUI's loras folder; a counter is added."),
                io.Boolean.Input("bake_strength", default=True,
                                 tooltip="Scale the saved LoRA by the transfer's strength, so loading it at 1.0 "
                                         "gives what the Transfer node showed."),
            ],
            outputs=[output(io.String, "path", "Where the file was written.")],
        )

    @classmethod
    def execute(cls, transfer: TransferHandle, filename_prefix, bake_strength) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths("loras")[0]
        path = next_free_path(folder, filename_prefix)
        count = save_transfer(transfer, path, bake_strength=bake_strength)
        message = f"Saved {count} layers to loras/{os.path.relpath(path, folder)}"
        return io.NodeOutput(path, ui={"text": [message]})
