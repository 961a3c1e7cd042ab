"""Start a real ComfyUI server (its own ``main.py``) in this process, for tests/test_browser_report.py.

Usage: ``python tests/comfy_launch.py <ComfyUI tree>/main.py --cpu --listen 127.0.0.1 --port N ...``

The only thing done before ComfyUI's ``main.py`` runs unchanged (as ``__main__``, with the given
arguments) is the torchvision op declaration of ``lorax_cli/host_boot.py``: the registry's CUDA-only
torchvision wheel cannot import on CPU torch otherwise, and ComfyUI imports it at start-up
(scripts/README-host.md, "torchvision"). ``tests/`` is taken off ``sys.path`` so none of the test
helpers can shadow a library name inside the server.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].endswith("main.py"):
        raise SystemExit("usage: comfy_launch.py <ComfyUI>/main.py [ComfyUI arguments...]")
    main_py = os.path.abspath(sys.argv[1])
    spec = importlib.util.spec_from_file_location("_lorax_host_boot", REPO_ROOT / "lorax_cli" / "host_boot.py")
    boot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boot)
    boot.declare_torchvision_schemas()
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(main_py))
    sys.argv = [main_py] + sys.argv[2:]
    sys.modules["_lorax_host_boot"] = boot  # keeps the op library (and the declared schemas) alive
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
