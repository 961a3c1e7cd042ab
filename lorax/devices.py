"""Where the float64 arithmetic runs: never on a device that lacks float64.

The Gram route and the exact SVD need float64 (squaring the spectrum in float32 loses the
directions near the cut: ~1e-1 error of the projected deltas measured, against 7e-7 in float64;
a float32 ``torch.linalg.svd`` is off by ~1e-3, docs/performance.md). Devices differ:

* **CPU, NVIDIA CUDA, AMD ROCm** (which reports as ``cuda``): float64 works; it runs there.
  Consumer NVIDIA cards do float64 at 1/64 of their float32 rate, yet even that (~1.3 TFLOP/s
  on an RTX 4090) is above a desktop CPU's float64 rate, and the decompositions are cached, so
  the GPU keeps them. (The float32-vs-float64 figures on a real GPU are issue 15's; no device
  has been lent yet.)
* **Apple MPS** has no float64 at all, DirectML (``privateuseone``) and some XPU builds neither:
  the decompositions run on the **CPU in float64**, each weight copied there one layer at a time.
  The alternative, a float32 SVD on the device, costs ~1e-3 relative error on every projected
  delta (measured on this project's benchmark, docs/performance.md), 1000× the float64 route's,
  for a speed-up the on-disk cache makes a one-time saving.
* any other device is probed once: a tiny float64 computation there either works or it does not.

:func:`float64_device` gives the device to compute on; the rest of the library asks it before
any ``.double()`` on a tensor that may live on an accelerator.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

#: Device types known to lack float64 (no probe needed; MPS raises on any float64 tensor).
NO_FLOAT64: frozenset[str] = frozenset({"mps", "privateuseone"})
#: Device types known to have it.
HAS_FLOAT64: frozenset[str] = frozenset({"cpu", "cuda", "meta"})

_PROBED: dict[str, bool] = {}
_LOCK = threading.Lock()


def _probe(device: torch.device) -> bool:
    """Whether a small float64 matrix product runs on ``device``."""
    try:
        x = torch.ones(2, 2, dtype=torch.float64, device=device)
        return bool((x @ x).sum().item() == 8.0)
    except Exception:  # noqa: BLE001 - any failure means "not usable", whatever the backend raises
        return False


def has_float64(device: torch.device | str, probe: Callable[[torch.device], bool] = _probe) -> bool:
    """Whether float64 arithmetic can run on ``device`` (known types answered, others probed once)."""
    device = torch.device(device)
    if device.type in HAS_FLOAT64:
        return True
    if device.type in NO_FLOAT64:
        return False
    with _LOCK:
        if device.type not in _PROBED:
            _PROBED[device.type] = bool(probe(device))
        return _PROBED[device.type]


def float64_device(device: torch.device | str | None,
                   probe: Callable[[torch.device], bool] = _probe) -> torch.device:
    """The device float64 work asked for on ``device`` runs on: itself if it has float64, else the CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return device if has_float64(device, probe) else torch.device("cpu")


def describe(device: torch.device | str | None) -> str:
    """One line for reports: where the decompositions run, and why."""
    asked = torch.device(device) if device is not None else torch.device("cpu")
    actual = float64_device(asked)
    if actual == asked:
        return f"decompositions run on {asked} in float64"
    return (f"decompositions run on the CPU in float64: {asked} has no float64 "
            "(a float32 SVD there would cost ~1e-3 relative error on every transferred layer)")
