#!/usr/bin/env python3
"""Memory and time of reading one quantized Flux-shaped layer, and of decomposing it.

Flux.1's largest layer is ``single_blocks.*.linear1`` (21504 × 3072, 66 M values: 264 MB as
float32). For each format — comfy-kitchen NVFP4 and INT8 (the host's ``QuantizedTensor``) and GGUF
Q4_0 / Q8_0 (bytes from the ``gguf`` package) — this prints the stored bytes, the peak extra
resident memory while :func:`lorax.weight_formats.dense_weight` turns it into the float32 matrix,
and the peak while the SVD engine decomposes it (Gram route, k = 320), measured by sampling the
process's RSS every millisecond. Only that one layer is ever dequantized.

    .venv/bin/python bench/quantized.py [--rows 21504 --cols 3072] [--formats nvfp4,int8,q4_0,q8_0]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lorax.engine import SVDEngine  # noqa: E402
from lorax.weight_formats import dense_weight, weight_format  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self):
        gc.collect()
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.extra_mb = (self.peak - self.base) / 1e6


def make(fmt: str, w: torch.Tensor):
    if fmt in ("nvfp4", "int8", "mxfp8"):
        import comfy_kitchen.tensor as ck

        layout = {"nvfp4": "TensorCoreNVFP4Layout", "int8": "TensorWiseINT8Layout",
                  "mxfp8": "TensorCoreMXFP8Layout"}[fmt]
        q = ck.QuantizedTensor.from_float(w.to(torch.bfloat16), layout)
        return q, q.storage_shape, q._qdata.nbytes
    import gguf

    from gguf_standin import packed_tensor

    t = packed_tensor(w, gguf.GGMLQuantizationType[fmt.upper()])
    return t, tuple(torch.Tensor.size(t)), torch.Tensor.as_subclass(t, torch.Tensor).nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=21504)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--formats", default="nvfp4,int8,q4_0,q8_0")
    ap.add_argument("--rank", type=int, default=320)
    args = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols) / args.cols ** 0.5
    print(f"layer {args.rows} × {args.cols} ({w.numel() / 1e6:.0f} M values; float32 matrix "
          f"{w.numel() * 4 / 1e6:.0f} MB); torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'format':<42} {'stored':>10} {'read s':>7} {'read peak':>10} {'SVD s':>7} {'SVD peak':>9}  rel. err")
    for fmt in args.formats.split(","):
        q, storage, nbytes = make(fmt, w)
        with PeakRSS() as read:
            t0 = time.perf_counter()
            dense = dense_weight(q, key="single_blocks.0.linear1.weight")
            read_s = time.perf_counter() - t0
        err = float((dense.double() - w.double()).norm() / w.double().norm())
        del dense
        engine = SVDEngine(method="gram", workers=1)
        with PeakRSS() as svd:
            t0 = time.perf_counter()
            engine.factors(q, args.rank)
            svd_s = time.perf_counter() - t0
        print(f"{weight_format(q):<42} {nbytes / 1e6:>7.0f} MB {read_s:>7.2f} {read.extra_mb:>7.0f} MB "
              f"{svd_s:>7.1f} {svd.extra_mb:>6.0f} MB  {err:.2e}   (storage {tuple(storage)})")
        del q, engine
        gc.collect()


if __name__ == "__main__":
    main()
