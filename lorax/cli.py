"""``python -m lorax``: subspace similarity, adapter transfer and LoRA → LoRA-X conversion, and
the same over a folder of LoRAs (``scan``, ``transfer-many``: :mod:`lorax.batch`).

Models and adapters are read the way ComfyUI reads them (its model detection, key maps and
LoRA loaders), so the ComfyUI host is needed: ``$COMFYUI_PATH``, the ComfyUI this pack is
installed in, or the tree ``scripts/setup`` fetched. Works without a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types
from pathlib import Path

from .errors import LoraxError
from .layer_map import MODES as LAYER_MAP_MODES, load_user_map
from .projection import MODES
from .skip_reasons import why_left_out
from .transfer import DEFAULT_MODE, DEFAULT_RANK, DEFAULT_THRESHOLD, TransferSettings

PACK_ROOT = Path(__file__).resolve().parent.parent
_PACK_NAME = "lorax_comfyui_pack"


def _backend():
    """Boot the host and import the pack's ``nodes/cli_backend.py`` (ComfyUI owns the name ``nodes``)."""
    spec = importlib.util.spec_from_file_location(f"{_PACK_NAME}_boot", PACK_ROOT / "nodes" / "host_boot.py")
    boot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boot)
    boot.boot(PACK_ROOT)
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ComfyUI warns at import about optional audio packages; not our business
    try:
        if _PACK_NAME not in sys.modules:
            pkg = types.ModuleType(_PACK_NAME)
            pkg.__path__ = [str(PACK_ROOT)]
            sys.modules[_PACK_NAME] = pkg
        return importlib.import_module(f"{_PACK_NAME}.nodes.cli_backend")
    finally:
        root.setLevel(max(level, logging.WARNING))


def _engine(exact: bool):
    import torch

    from .engine import SVDEngine
    from .svd_cache import cache_from_env

    store = cache_from_env(Path.home() / ".cache" / "lorax" / "svd")
    return SVDEngine(method="exact" if exact else "gram", device="cuda" if torch.cuda.is_available() else "cpu",
                     store=store)


def _progress(label: str):
    def update(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{label}: {done}/{total} layers", end="" if done < total else "\n", file=sys.stderr)
    return update


def _same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _check_inputs(*paths: str) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise LoraxError("file not found; check the path", path=path)


def cmd_similarity(args) -> int:
    _check_inputs(args.source, args.target)
    if _same_file(args.source, args.target):
        raise LoraxError("source and target are the same file; compare two different checkpoints")
    be = _backend()
    t0 = time.perf_counter()
    source, target = be.load_model(args.source), be.load_model(args.target)
    layer_set = be.LAYER_SETS[1] if args.all_layers else be.LAYER_SETS[0]
    rows, text, _ = be.run_similarity(source, target, rank=args.rank, layer_set=layer_set, threshold=args.threshold,
                                      engine=_engine(args.exact), progress=_progress("similarity"),
                                      layer_map_mode=args.layer_map, user_map=_user_map(args.layer_map_file))
    print(text)
    print(f"time: {time.perf_counter() - t0:.1f} s")
    if args.json:
        out = [{k: r[k] for k in ("key", "source_key", "phi", "phi_right", "chance", "chance_right", "phi_hat",
                                  "phi_hat_right", "k", "shape_source", "shape_target")} for r in rows]
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def cmd_transfer(args) -> int:
    settings = TransferSettings(rank=args.rank, threshold=args.threshold, mode=args.mode, shape_rule=args.shape_rule,
                                cross_attention_kv=not args.no_cross_attention_kv)
    _check_inputs(args.source, args.target, args.adapter)
    if _same_file(args.source, args.target):
        raise LoraxError("source and target are the same file; the target must be a different checkpoint")
    be = _backend()
    t0 = time.perf_counter()
    source, target = be.load_model(args.source), be.load_model(args.target)
    adapter = be.AdapterHandle.open(os.path.basename(args.adapter), args.adapter)
    handle = be.run_transfer(source, target, adapter, settings, _engine(args.exact), strength=args.strength,
                             progress=_progress("transfer"), layer_map_mode=args.layer_map,
                             user_map=_user_map(args.layer_map_file))
    print(handle.verdict)
    for row in handle.rows:
        phi = "" if row.get("phi_hat") is None else f"  Φ̂ {row['phi_hat']:.3f}/{row['phi_hat_right']:.3f}"
        kept = "" if row.get("energy_kept") is None else f"  kept {100 * row['energy_kept']:.0f}%"
        moved = "" if row.get("source_key") in (None, row["key"]) else f"  (from {row['source_key']})"
        print(f"{row['decision']:<36} {row['key']}{moved}{phi}{kept}")
    written = be.save_transfer(handle, args.out, bake_strength=True)
    print(f"summary: {handle.result.summary()}; wrote {written} layers to {args.out}; "
          f"total {time.perf_counter() - t0:.1f} s")
    for line in why_left_out(handle.result.layers):
        print(f"  {line}")
    return 0


def _user_map(path: str | None):
    if not path:
        return None
    _check_inputs(path)
    return load_user_map(Path(path).read_text(), path=path)


def cmd_convert(args) -> int:
    _check_inputs(args.source, args.adapter)
    be = _backend()
    from .lorax_adapter import save_lorax

    source = be.load_model(args.source)
    adapter = be.AdapterHandle.open(os.path.basename(args.adapter), args.adapter)
    converted, rows, summary = be.convert_adapter(source, adapter, args.rank, _engine(args.exact))
    for row in rows:
        print(f"kept {100 * row['kept']:5.1f}%  r {row['rank']:>4}  {row['module']}")
    save_lorax(args.out, converted)
    print(f"summary: {summary}")
    print(f"wrote {len(converted.sigmas)} layers, {converted.parameter_count} parameters, "
          f"{os.path.getsize(args.out)} bytes to {args.out}")
    return 0


def _layer_map_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer-map", choices=LAYER_MAP_MODES, default="similarity",
                   help="pair layers by role and similarity where block counts differ (default), or by name only")
    p.add_argument("--layer-map-file", help='JSON {"target key": "source key"} overriding the layer map')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lorax", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("similarity", help="per-layer subspace similarity Φ of two models")
    s.add_argument("--source", required=True, help="source checkpoint or diffusion model (.safetensors)")
    s.add_argument("--target", required=True, help="target checkpoint or diffusion model (.safetensors)")
    s.add_argument("--rank", type=int, default=DEFAULT_RANK, help="top-k directions (capped at half each layer's rank)")
    s.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="Φ̂ a layer needs to be transferred")
    s.add_argument("--all-layers", action="store_true", help="compare every linear/conv weight, not only LoRA targets")
    s.add_argument("--json", help="also write the rows as JSON to this file")
    s.add_argument("--exact", action="store_true", help="full float64 SVD instead of the Gram route")
    _layer_map_arguments(s)
    s.set_defaults(func=cmd_similarity)

    t = sub.add_parser("transfer", help="move an adapter from the source model to the target model")
    t.add_argument("--source", required=True, help="the checkpoint the adapter was trained on")
    t.add_argument("--target", required=True, help="the checkpoint to move it to")
    t.add_argument("--adapter", required=True, help="a LoRA-X file or any LoRA/LyCORIS file ComfyUI reads")
    t.add_argument("--out", required=True, help="where to write the transferred kohya LoRA (.safetensors)")
    t.add_argument("--rank", type=int, default=DEFAULT_RANK)
    t.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    t.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help=f"projection (default {DEFAULT_MODE}; LoRA-X adapters are identical in both)")
    t.add_argument("--shape-rule", choices=("skip", "paired"), default="skip")
    t.add_argument("--strength", type=float, default=1.0, help="baked into the written file")
    t.add_argument("--no-cross-attention-kv", action="store_true",
                   help="leave the cross-attention to_k/to_v layers out (they read the text encoder's features)")
    _layer_map_arguments(t)
    t.add_argument("--exact", action="store_true", help="full float64 SVD instead of the Gram route")
    t.set_defaults(func=cmd_transfer)

    c = sub.add_parser("convert", help="turn an ordinary LoRA into a LoRA-X adapter on its source model")
    c.add_argument("--source", required=True, help="the checkpoint the LoRA was trained on")
    c.add_argument("--adapter", required=True, help="any LoRA/LyCORIS file ComfyUI reads")
    c.add_argument("--out", required=True, help="where to write the LoRA-X file (.safetensors)")
    c.add_argument("--rank", type=int, default=DEFAULT_RANK, help="r per layer (capped at the layer's rank)")
    c.add_argument("--exact", action="store_true", help="full float64 SVD instead of the Gram route")
    c.set_defaults(func=cmd_convert)

    from .batch import add_parsers  # scan, transfer-many (a LoRA library at once)

    add_parsers(sub, _layer_map_arguments)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    # Nothing here trains: ComfyUI's loaders hand out parameters that require grad, and autograd
    # would record every Gram matrix for a backward pass that never comes (measured on the demo
    # SD1.5 pair with a LoRA on 70 layers, no cache: peak RSS 3.9 GB with it, 1.7 GB without;
    # identical output files).
    torch.set_grad_enabled(False)
    try:
        return args.func(args)
    except LoraxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "no ComfyUI found" in str(e):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
