"""What the commands share: the booted host's loaders, the SVD engine, and the checks on paths.

Public names on purpose: :mod:`lorax_cli.cli`, :mod:`lorax_cli.batch` and
:mod:`lorax_cli.ray_batch` all import them from here, so none reaches into another's private
helpers and the three import no one but this module (and batch → ray_batch) — no cycle.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import types
from pathlib import Path

from lorax.errors import LoraxError
from lorax.layer_map import load_user_map

from .host_boot import boot

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "lorax_comfyui_pack"

#: Where the command line keeps its SVD cache unless LORAX_SVD_CACHE says otherwise.
DEFAULT_CACHE_FOLDER = Path.home() / ".cache" / "lorax" / "svd"


def backend():
    """Boot the host, then import the pack's ``nodes/cli_backend.py``.

    ComfyUI owns the top-level name ``nodes`` (its ``nodes.py``), so the pack's ``nodes/`` is
    imported as ``lorax_comfyui_pack.nodes``, a package of a namespace made for it here — as
    ComfyUI itself imports the pack under its folder name.
    """
    boot(PACK_ROOT)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ComfyUI warns at import about optional audio packages; not our business
    try:
        if PACK_NAME not in sys.modules:
            pkg = types.ModuleType(PACK_NAME)
            pkg.__path__ = [str(PACK_ROOT)]
            sys.modules[PACK_NAME] = pkg
        return importlib.import_module(f"{PACK_NAME}.nodes.cli_backend")
    finally:
        root.setLevel(max(level, logging.WARNING))


def make_engine(exact: bool, use_cache: bool = True):
    """The command line's SVD engine: on the GPU when there is one, with the user's SVD cache."""
    import torch

    from lorax.engine import SVDEngine
    from lorax.svd_cache import cache_from_env

    store = cache_from_env(DEFAULT_CACHE_FOLDER) if use_cache else None
    return SVDEngine(method="exact" if exact else "gram", device="cuda" if torch.cuda.is_available() else "cpu",
                     store=store)


@contextlib.contextmanager
def batch_engine(exact: bool):
    """:func:`make_engine`'s engine, or, with the cache off, one whose cache is a temporary folder
    for the run: the memo's size bound must not make a batch decompose a layer twice."""
    engine = make_engine(exact)
    if engine.store is not None:
        yield engine
        return
    from lorax.svd_cache import SVDCache

    with tempfile.TemporaryDirectory(prefix="lorax-batch-svd-") as folder:
        engine.store = SVDCache(folder)
        yield engine


def progress(label: str):
    """A progress callback printing ``label: done/total layers`` on a terminal, nothing otherwise."""
    def update(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{label}: {done}/{total} layers", end="" if done < total else "\n", file=sys.stderr)
    return update


def same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_inputs(*paths: str) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise LoraxError("file not found; check the path", path=path)


def check_output(out: str, inputs: dict[str, str | None], overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse to write ``out`` over one of the command's inputs (``{"--source": path, …}``), by
    path or as the same file under another name (a hard link, a symlink), whatever the flags; and
    over any other existing file unless ``overwrite``. Called before the work and again just
    before the write, which then replaces ``out`` atomically (temporary file + rename)."""
    for name, path in inputs.items():
        if path and same_file(out, path):
            raise LoraxError(f"{flag} is the same file as {name}; nothing was written. The command line never "
                             f"writes over one of its inputs: give {flag} a new file name", path=out)
    if os.path.isdir(out):
        raise LoraxError(f"{flag} is a folder; nothing was written. Give {flag} a file name (.safetensors)", path=out)
    if os.path.lexists(out) and not overwrite:
        raise LoraxError(f"{flag} already exists; nothing was written. Give {flag} a new file name, or add "
                         "--overwrite to replace it", path=out)


def read_user_map(path: str | None):
    """The ``--layer-map-file`` (JSON ``{"target key": "source key"}``), or None without one."""
    if not path:
        return None
    check_inputs(path)
    return load_user_map(Path(path).read_text(), path=path)
