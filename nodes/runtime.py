"""Process-wide state shared by the nodes: the SVD engines and progress reporting.

One engine per (method, device) lives for the whole ComfyUI process, so re-running a graph, or
moving a second adapter between the same two models, decomposes nothing: the latest factors are
in the engine's memo (256 MiB), the rest in the on-disk cache the engines share under ComfyUI's
user directory (``lorax-svd-cache``; see ``LORAX_SVD_CACHE`` / ``LORAX_SVD_CACHE_GB`` in the
README), so a restart loses nothing either. The environment is read when an engine is made, so
turning the cache off or moving it takes a ComfyUI restart; every report ends with the cache's
size, folder and what the run read (docs/cache.md).
"""

from __future__ import annotations

import threading

import os

import comfy.model_management
import comfy.utils
import folder_paths

from lorax.engine import SVDEngine
from lorax.svd_cache import cache_from_env

_ENGINES: dict[tuple[str, str], SVDEngine] = {}
_LOCK = threading.Lock()


def get_engine(exact: bool = False) -> SVDEngine:
    """The shared engine: float64 Gram route (fast, accurate) or float64 full SVD when ``exact``."""
    device = comfy.model_management.get_torch_device()
    method = "exact" if exact else "gram"
    key = (method, str(device))
    with _LOCK:
        if key not in _ENGINES:
            store = cache_from_env(os.path.join(folder_paths.get_user_directory(), "lorax-svd-cache"))
            _ENGINES[key] = SVDEngine(method=method, device=device, store=store)
        return _ENGINES[key]


def progress_bar(total: int):
    """A callback ``(done, total)`` driving ComfyUI's progress bar for the running node."""
    bar = comfy.utils.ProgressBar(max(1, total))

    def update(done: int, total_now: int) -> None:
        bar.update_absolute(done, max(1, total_now))

    return update
