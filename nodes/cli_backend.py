"""What the command line needs from the host: loading checkpoints and adapters as ComfyUI does."""

from __future__ import annotations

import os

import comfy.sd

from lorax.errors import LoraxError
from lorax.safetensors_io import check_safetensors_file

from .convert_node import convert_adapter
from .handles import AdapterHandle
from .similarity_node import LAYER_SETS, run_similarity
from .transfer_job import check_distinct, run_transfer, save_transfer

__all__ = ["AdapterHandle", "LAYER_SETS", "check_distinct", "convert_adapter", "load_model", "run_similarity", "run_transfer",
           "save_transfer"]


def load_model(path: str):
    """A ``ModelPatcher`` for a checkpoint or a diffusion-model-only safetensors file."""
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
