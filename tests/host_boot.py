"""Stage 1 of the tests' in-process ComfyUI host: find the tree and prepare it before any ``comfy`` import.

Cheap (torch import + argparse) and run by ``tests/conftest.py`` at import time, so it precedes any
``comfy`` import a test module might make (:func:`prepare_early`). The host itself is
:mod:`graph_runner`; ``tests/host.py`` re-exports both.
"""

from __future__ import annotations

import atexit
import importlib.machinery
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent

SETUP_HINT = "run `scripts/setup` (or set COMFYUI_PATH to a ComfyUI checkout)"

# --------------------------------------------------------------------------------------
# Locating the tree: the same rules as scripts/get-comfyui (loaded from that file).
# --------------------------------------------------------------------------------------


def _get_comfyui_module():
    path = REPO_ROOT / "scripts" / "get-comfyui"
    loader = importlib.machinery.SourceFileLoader("_lorax_get_comfyui", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


_GET_COMFYUI = _get_comfyui_module()
COMFYUI_VERSION = _GET_COMFYUI.COMFYUI_VERSION


def locate_comfyui() -> tuple[Path | None, str]:
    """``(tree, how)`` by the rules of scripts/get-comfyui, or ``(None, why)``. Never downloads."""
    return _GET_COMFYUI.locate(REPO_ROOT)


# --------------------------------------------------------------------------------------
# Stage 1: before any comfy import.
# --------------------------------------------------------------------------------------

# The torchvision op library. Must stay referenced for the whole process: if this
# object is garbage-collected, the op schemas vanish and `import torchvision` breaks.
_TV = None

_early: dict[str, Any] = {}


def declare_torchvision_schemas() -> bool:
    """See lorax_cli/host_boot.py: the same declaration the command line uses."""
    global _TV
    declared = _HOST_BOOT.declare_torchvision_schemas()
    _TV = _HOST_BOOT._TORCHVISION_LIB
    return declared


def _host_boot_module():
    """The pack's lorax_cli/host_boot.py, loaded by path (it imports nothing from ComfyUI): the
    repository need not be on ``sys.path`` (test_pack_startup's probe keeps it off)."""
    path = REPO_ROOT / "lorax_cli" / "host_boot.py"
    spec = importlib.util.spec_from_file_location("_lorax_host_boot", str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_HOST_BOOT = _host_boot_module()


def prepare_early() -> dict[str, Any]:
    """Stage 1 (idempotent, cheap). Returns a dict with tree, how, base_dir (tree may be None)."""
    if _early:
        return _early
    declare_torchvision_schemas()
    tree, how = locate_comfyui()
    _early.update(tree=tree, how=how, base_dir=None)
    if tree is None:
        return _early

    base = Path(tempfile.mkdtemp(prefix="lorax-comfy-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    _early["base_dir"] = base

    tree_s = str(tree)
    if tree_s in sys.path:
        sys.path.remove(tree_s)
    sys.path.insert(0, tree_s)

    if "comfy.cli_args" in sys.modules:
        # Someone imported comfy before us; only acceptable if it runs on CPU.
        from comfy.cli_args import args

        if not args.cpu:
            raise RuntimeError("comfy was imported before tests/host.py could pass --cpu to it")
        _early["base_dir"] = None
        return _early

    saved = sys.argv
    sys.argv = [saved[0] if saved else "comfyui", "--cpu", "--base-directory", str(base)]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # parses sys.argv now, once  # noqa: F401
    finally:
        sys.argv = saved
    return _early
