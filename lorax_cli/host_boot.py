"""Starting ComfyUI's modules inside a plain Python process (the command line, the tests, the benchmarks).

Part of the command line's layer, not of ``nodes/``: inside a running ComfyUI it is never needed.
Imports nothing from ComfyUI itself, so it can run before the first ``comfy`` import, which is
when ComfyUI reads its command line and probes CUDA. Inside a running ComfyUI none of this is
needed or used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

COMFYUI_VERSION = "0.3.75"
_TORCHVISION_LIB = None  # must stay alive for the whole process, or the declared ops vanish


def is_comfy_tree(path) -> bool:
    return path is not None and (Path(path) / "comfy").is_dir() and (Path(path) / "nodes.py").is_file()


def locate_comfyui(pack_root: Path) -> Path | None:
    """``$COMFYUI_PATH``, else the ComfyUI this pack is installed in, else the test/CI cache."""
    env = os.environ.get("COMFYUI_PATH")
    if env and is_comfy_tree(env):
        return Path(env).resolve()
    parent = pack_root.resolve().parent
    if parent.name == "custom_nodes" and is_comfy_tree(parent.parent):
        return parent.parent
    cache = Path(os.environ.get("LORAX_HOST_CACHE", Path.home() / ".cache" / "lorax-comfyui")) / f"ComfyUI-{COMFYUI_VERSION}"
    return cache if is_comfy_tree(cache) else None


def declare_torchvision_schemas() -> bool:
    """Let a CUDA-only torchvision wheel import on CPU torch (its C extension cannot load there).

    torchvision's Python import registers fake kernels for ``nms`` and ``qnms``, which fails when
    its extension did not define them. Declaring the two schemas first lets the import succeed
    (detection ops stay unusable; nothing here needs them). Skipped when torchvision is already
    imported, torch has CUDA, a CPU build of torchvision is installed, or the ops exist.
    Returns True when the schemas are declared (now or earlier).
    """
    global _TORCHVISION_LIB
    import torch

    if _TORCHVISION_LIB is not None:
        return True
    if "torchvision" in sys.modules or torch.version.cuda is not None:
        return False
    try:
        import importlib.metadata as md

        if md.version("torchvision").endswith("+cpu"):
            return False
    except Exception:
        pass
    try:
        torch.ops.torchvision.nms  # noqa: B018  (raises when the op is not declared)
        return False
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB = lib
    return True


def boot(pack_root: Path, *, cpu: bool | None = None) -> Path:
    """Put ComfyUI on ``sys.path`` and parse its arguments (``--cpu`` when asked or no GPU)."""
    if "comfy.cli_args" in sys.modules:  # already booted (a test process, ComfyUI itself)
        return Path(next(iter(sys.modules["comfy"].__path__))).parent  # comfy may be a namespace package
    tree = locate_comfyui(pack_root)
    if tree is None:
        raise RuntimeError("no ComfyUI found: set COMFYUI_PATH to your ComfyUI folder, install this pack into "
                           "ComfyUI/custom_nodes/, or run scripts/setup")
    import torch

    declare_torchvision_schemas()
    if str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    if cpu is None:
        cpu = not torch.cuda.is_available()
    saved = sys.argv
    sys.argv = [saved[0] if saved else "lorax"] + (["--cpu"] if cpu else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv now, once)
    finally:
        sys.argv = saved
    return tree
