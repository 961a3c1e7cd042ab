#!/usr/bin/env python3
"""What storing SVD factors at half precision costs, float16 against bfloat16 (a script, not a test).

The SVD cache keeps U and V at the engine's ``stored_dtype`` and the engine computes with those
rounded numbers (lorax/engine.py). This measures, per SDXL layer shape, the relative error of the
projected delta (``lorax`` and ``prolora`` modes, a random rank-32 LoRA) and the change of Φ̂ when
the engine's factors are rounded to float32, float16 or bfloat16 — all against the float64 exact
route on the same stored weights — and, as the yardstick, the *float16 storage floor*: how much the
projected delta changes when the weight itself is rounded to float16 (what every fp16 checkpoint
already does), i.e. exact factors of the float64 weight against exact factors of its fp16 copy.

It also weighs storing less: V could be recomputed from U and the weight (``V = WᵀU/σ``). Per
shape it prints the bytes a warm run reads either way (V in float16, n·k·2, against the fp16
weight, m·n·2) and the time of the work each needs on top of reading: upcasting the stored V, or
upcasting the weight and the product ``WᵀU/σ`` (best of 3, single process; a busy machine makes
both slower).

Weights are like trained ones (and like bench/transfer.py's): singular values ∝ i^-0.8 in random
orthonormal bases, entry rms 0.02, stored as float16; the target is the source plus a 5 % change
(half rank 8, half dense). k = 320 capped at half the layer's rank, the transfer default.

    .venv/bin/python bench/cache_precision.py            # SDXL shapes, one layer each (~2-4 min)
    .venv/bin/python bench/cache_precision.py --quick    # the two smallest shapes
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from lorax.delta import Delta  # noqa: E402
from lorax.engine import SVDEngine  # noqa: E402
from lorax.projection import project_lorax, project_prolora  # noqa: E402
from lorax.similarity import layer_similarity  # noqa: E402
from lorax.svd import SVDFactors  # noqa: E402

from measure import best  # noqa: E402  (bench/ is sys.path[0])

#: SDXL's distinct attention / feed-forward shapes (bench/transfer.py derives the full list).
SHAPES = [(640, 640), (640, 2048), (5120, 640), (1280, 1280), (1280, 2048), (10240, 1280), (1280, 5120)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def power_law(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    S = torch.arange(1, r + 1, dtype=torch.float64) ** -0.8
    S *= 0.02 * math.sqrt(m * n) / float(S.norm())
    return (U * S) @ V.mT


def fine_tune(W: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    m, n = W.shape
    low = torch.randn(m, 8, generator=g, dtype=torch.float64) @ torch.randn(8, n, generator=g, dtype=torch.float64)
    dense = torch.randn(m, n, generator=g, dtype=torch.float64)
    norm = float(W.norm())
    return W + 0.05 * norm * math.sqrt(0.5) * (low / low.norm() + dense / dense.norm())


def exact_top(W: torch.Tensor, k: int) -> SVDFactors:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return SVDFactors(U[:, :k], S[:k], Vh[:k].mT)


def rel(a: Delta, b: Delta) -> float:
    A, B = a.matrix().double(), b.matrix().double()
    return float((A - B).norm() / B.norm())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the two smallest shapes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    shapes = SHAPES[:2] if args.quick else SHAPES
    t0 = time.perf_counter()
    print(f"{'shape':>12} {'k':>4} {'factors':>9} {'lorax err':>10} {'prolora err':>11} {'|ΔΦ̂|':>8} "
          f"{'fp16 weight floor':>18}")
    worst = {name: [0.0, 0.0, 0.0] for name in DTYPES}
    recompute = []
    for m, n in shapes:
        g = torch.Generator().manual_seed(args.seed * 1000003 + m * 7919 + n)
        Ws64 = power_law(m, n, g)
        Wt64 = fine_tune(Ws64, g)
        Ws, Wt = Ws64.half(), Wt64.half()  # the stored checkpoints
        k = min(320, min(m, n) // 2)
        delta = Delta.factored((m, n), torch.randn(m, 32, generator=g) * 0.01, torch.randn(32, n, generator=g) / math.sqrt(n))
        fs, ft = exact_top(Ws, k), exact_top(Wt, k)
        ref_l, ref_p = project_lorax(delta, ft), project_prolora(delta, fs, ft)
        ref_phi = layer_similarity(fs, ft, k).phi_hat_min
        floor = rel(project_lorax(delta, exact_top(Wt64, k)), ref_l)
        for name, dtype in DTYPES.items():
            engine = SVDEngine(stored_dtype=dtype, workers=1)
            gs, gt = engine.factors_many([(Ws, k), (Wt, k)])
            el, ep = rel(project_lorax(delta, gt), ref_l), rel(project_prolora(delta, gs, gt), ref_p)
            dphi = abs(layer_similarity(gs, gt, k).phi_hat_min - ref_phi)
            worst[name] = [max(a, b) for a, b in zip(worst[name], (el, ep, dphi))]
            print(f"{m:>5}×{n:<6} {k:>4} {name:>9} {el:>10.2e} {ep:>11.2e} {dphi:>8.1e} {floor:>18.1e}", flush=True)
            if dtype == torch.float16:
                V16, U, S = gt.V.half(), gt.U, gt.S
                t_read = best(lambda: V16.float())
                t_make = best(lambda: (Wt.float().mT @ U) / S)
                recompute.append((m, n, k, 2 * n * k, 2 * m * n, t_read, t_make))
    print("\nstoring V against recomputing it from U and the weight (a warm run reads no weight today):")
    print(f"{'shape':>12} {'V bytes':>9} {'W bytes':>9} {'upcast V s':>11} {'WᵀU/σ s':>9}")
    for m, n, k, vb, wb, tr, tm in recompute:
        print(f"{m:>5}×{n:<6} {vb / 1e6:>7.2f}MB {wb / 1e6:>7.2f}MB {tr:>11.4f} {tm:>9.4f}")
    print("\nworst over the shapes (projected delta relative to float64; Φ̂ absolute):")
    for name, (el, ep, dphi) in worst.items():
        print(f"  {name:>9}: lorax {el:.1e}, prolora {ep:.1e}, Φ̂ {dphi:.1e}")
    print(f"({time.perf_counter() - t0:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
