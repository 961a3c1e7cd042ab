"""What the command line needs from the host: loading checkpoints and adapters as ComfyUI does."""

from __future__ import annotations

import os

import comfy.sd

from lorax.errors import LoraxError
from lorax.safetensors_io import check_safetensors_file

from .convert_node import convert_adapter
from .handles import AdapterHandle
from .library import decompose_for_batch, scan_file, transfer_file
from .similarity_node import LAYER_SETS, run_similarity
from .transfer_job import check_distinct, run_transfer, save_transfer

__all__ = ["AdapterHandle", "LAYER_SETS", "check_distinct", "convert_adapter", "load_model", "run_similarity", "run_transfer",
           "save_transfer", "scan_file", "transfer_file",
           "decompose_for_batch"]


def load_model(path: str):
    """A ``ModelPatcher`` for a checkpoint or a diffusion-model-only safetensors file.

    Quantized safetensors files (fp8, scaled fp8, ComfyUI's quantized layouts) load through the
    host's loaders as in ComfyUI; GGUF files need the ComfyUI-GGUF pack's loader, which only a
    running ComfyUI has, so they are refused here with what to do instead.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        raise LoraxError("this is a GGUF file, which only ComfyUI-GGUF's loader reads; in ComfyUI, load it "
                         "with 'Unet Loader (GGUF)' and connect it to LoRA-X Transfer, or give the command line "
                         "the safetensors file of the same model", path=path)
    header = check_safetensors_file(path)
    is_checkpoint = any(k.startswith("model.diffusion_model.") for k in header)
    try:
        if is_checkpoint:
            model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False,
                                                          output_clipvision=False)[0]
        else:
            model = comfy.sd.load_diffusion_model(path)
    except RuntimeError as e:
        raise LoraxError(f"ComfyUI could not load this model: {e}", path=path) from None
    if model is None:
        raise LoraxError("ComfyUI could not detect the model type of this file (is it a diffusion model or "
                         "checkpoint?)", path=path)
    model.lorax_origin = os.path.abspath(path)  # what the SVD cache lists this model's entries under
    return model
