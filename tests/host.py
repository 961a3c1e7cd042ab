"""A real ComfyUI host for the tests, run in-process, and the synthetic models and LoRAs they use.

One name for what lives in four modules by concern, so ``import host`` / ``from host import …``
in the tests, benchmarks and scripts keeps working:

* :mod:`host_boot` -- stage 1, before any ``comfy`` import (``prepare_early()``, run by
  ``tests/conftest.py``): the torchvision op schemas, the ComfyUI tree first on ``sys.path``,
  ComfyUI's command line parsed as ``--cpu --base-directory <per-session temp dir>``;
* :mod:`graph_runner` -- stage 2, the host itself (``get_comfy_host()`` / the ``comfy_host``
  fixture, ``ComfyHost``) and graph builders (``capture``, ``zero_cond``, ``unet_ksampler_prompt``);
* :mod:`model_builders` -- synthetic models needing no ComfyUI import (``build_mini_sd15_unet``,
  ``fine_tune``, full SD1.5 checkpoints);
* :mod:`lora_files` -- kohya LoRA state dicts and key helpers.
"""

from __future__ import annotations

# tests/ is on sys.path wherever ``host`` is importable (pytest, bench/, scripts/), so its siblings are too.
from graph_runner import (CAPTURE_NODE, HOST_NODES_FILE, ZERO_COND_NODE, ComfyExecutionError,
                          ComfyHost, capture, get_comfy_host, load_bench, load_pack, node_inputs, run_prompt,
                          unet_ksampler_prompt, zero_cond)
from host_boot import (COMFYUI_VERSION, REPO_ROOT, SETUP_HINT, TESTS_DIR, declare_torchvision_schemas,
                       locate_comfyui, prepare_early)
from lora_files import (kohya_lora_prefix, make_kohya_lora, make_sd15_lora_with_te, te_clip_key,
                        te_lora_prefix)
from model_builders import (SD1_VAE_DDCONFIG, SD15_TE_PREFIX, SD15_UNET_PREFIX, SD15_VAE_PREFIX,
                            build_full_sd15_checkpoint, build_mini_sd15_unet, build_sd15_text_encoder,
                            build_sd15_vae, count_params, fine_tune, fine_tune_text_encoder, power_law_matrix,
                            sd15_te_vae_layout, seeded_generator, spectral_matrix, unet_layout)

__all__ = [
    "CAPTURE_NODE", "COMFYUI_VERSION", "ComfyExecutionError", "ComfyHost", "HOST_NODES_FILE", "REPO_ROOT",
    "SD15_TE_PREFIX", "SD15_UNET_PREFIX", "SD15_VAE_PREFIX", "SD1_VAE_DDCONFIG", "SETUP_HINT", "TESTS_DIR",
    "ZERO_COND_NODE", "build_full_sd15_checkpoint", "build_mini_sd15_unet", "build_sd15_text_encoder",
    "build_sd15_vae", "capture", "count_params", "declare_torchvision_schemas", "fine_tune",
    "fine_tune_text_encoder", "get_comfy_host", "kohya_lora_prefix", "load_bench", "load_pack", "locate_comfyui",
    "make_kohya_lora", "make_sd15_lora_with_te", "node_inputs", "power_law_matrix", "prepare_early", "run_prompt",
    "sd15_te_vae_layout", "seeded_generator", "spectral_matrix", "te_clip_key", "te_lora_prefix",
    "unet_ksampler_prompt", "unet_layout", "zero_cond",
]
