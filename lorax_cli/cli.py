"""``python -m lorax``: subspace similarity, adapter transfer, LoRA → LoRA-X conversion, the SVD
cache, and the same over a folder of LoRAs (``scan``, ``transfer-many``: :mod:`lorax_cli.batch`).

Models and adapters are read the way ComfyUI reads them (its model detection, key maps and
LoRA loaders), so the ComfyUI host is needed: ``$COMFYUI_PATH``, the ComfyUI this pack is
installed in, or the tree ``scripts/setup`` fetched. Works without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lorax.adapter_check import check_adapter_file
from lorax.errors import LoraxError
from lorax.layer_map import MODES as LAYER_MAP_MODES
from lorax.skip_reasons import why_left_out
from lorax.transfer import DEFAULT_MODE, DEFAULT_RANK, DEFAULT_THRESHOLD, MODES, TransferSettings

from .batch import add_parsers
from .common import (DEFAULT_CACHE_FOLDER, backend, check_inputs, check_output, make_engine, progress,
                     read_user_map, same_file)


def _cache_line(engine) -> str:
    """One line on the SVD cache after a command: where, how big, what this run read and wrote."""
    return engine.cache_note()


def cmd_similarity(args) -> int:
    check_inputs(args.source, args.target)
    if same_file(args.source, args.target):
        raise LoraxError("source and target are the same file; compare two different checkpoints")
    inputs = {"--source": args.source, "--target": args.target, "--layer-map-file": args.layer_map_file}
    if args.json:  # a report, rewritten on every run: only the inputs are protected
        check_output(args.json, inputs, overwrite=True, flag="--json")
    be = backend()
    t0 = time.perf_counter()
    source, target = be.load_model(args.source), be.load_model(args.target)
    layer_set = be.LAYER_SETS[1] if args.all_layers else be.LAYER_SETS[0]
    engine = make_engine(args.exact, not args.no_cache)
    rows, text, _ = be.run_similarity(source, target, rank=args.rank, layer_set=layer_set, threshold=args.threshold,
                                      engine=engine, progress=progress("similarity"),
                                      layer_map_mode=args.layer_map, user_map=read_user_map(args.layer_map_file))
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
    check_inputs(args.source, args.target, args.adapter)
    if same_file(args.source, args.target):
        raise LoraxError("source and target are the same file; the target must be a different checkpoint")
    inputs = {"--source": args.source, "--target": args.target, "--adapter": args.adapter,
              "--layer-map-file": args.layer_map_file}
    check_output(args.out, inputs, args.overwrite)
    check_adapter_file(args.adapter)  # a damaged adapter fails before two checkpoints are loaded
    be = backend()
    t0 = time.perf_counter()
    source, target = be.load_model(args.source), be.load_model(args.target)
    adapter = be.AdapterHandle.open(os.path.basename(args.adapter), args.adapter)
    engine = make_engine(args.exact, not args.no_cache)
    handle = be.run_transfer(source, target, adapter, settings, engine, strength=args.strength,
                             progress=progress("transfer"), layer_map_mode=args.layer_map,
                             user_map=read_user_map(args.layer_map_file))
    print(handle.verdict)
    for row in handle.rows:
        phi = "" if row.get("phi_hat") is None and row.get("phi_hat_right") is None else \
            f"  Φ̂ {_score(row.get('phi_hat'))}/{_score(row.get('phi_hat_right'))}"
        kept = "" if row.get("energy_kept") is None else f"  kept {100 * row['energy_kept']:.0f}%"
        moved = "" if row.get("source_key") in (None, row["key"]) else f"  (from {row['source_key']})"
        print(f"{row['decision']:<36} {row['key']}{moved}{phi}{kept}")
    if not handle.result.deltas and (handle.clip_result is None or not handle.clip_result.deltas):
        # The verdict above says why (e.g. every layer differs in shape); an empty file helps nobody.
        print(f"summary: {handle.result.summary()}; nothing written to {args.out}")
        for line in why_left_out(handle.result.layers):
            print(f"  {line}")
        return 2
    check_output(args.out, inputs, args.overwrite)  # nothing appeared there meanwhile
    written = be.save_transfer(handle, args.out, bake_strength=True)
    print(f"summary: {handle.result.summary()}; wrote {written} layers to {args.out}; "
          f"total {time.perf_counter() - t0:.1f} s")
    for line in why_left_out(handle.result.layers):
        print(f"  {line}")
    print(_cache_line(engine))
    return 0


def _score(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def cmd_convert(args) -> int:
    check_inputs(args.source, args.adapter)
    inputs = {"--source": args.source, "--adapter": args.adapter}
    check_output(args.out, inputs, args.overwrite)
    check_adapter_file(args.adapter)
    be = backend()
    from lorax.lorax_adapter import save_lorax

    source = be.load_model(args.source)
    adapter = be.AdapterHandle.open(os.path.basename(args.adapter), args.adapter)
    engine = make_engine(args.exact, not args.no_cache)
    converted, rows, summary = be.convert_adapter(source, adapter, args.rank, engine)
    for row in rows:
        print(f"kept {100 * row['kept']:5.1f}%  r {row['rank']:>4}  {row['module']}")
    check_output(args.out, inputs, args.overwrite)
    save_lorax(args.out, converted)
    print(f"summary: {summary}")
    print(f"wrote {len(converted.sigmas)} layers, {converted.parameter_count} parameters, "
          f"{os.path.getsize(args.out)} bytes to {args.out}")
    print(_cache_line(engine))
    return 0


def cmd_cache(args) -> int:
    """List the SVD cache by model, or clear it (all of it, or one model's entries)."""
    from lorax.svd_cache import cache_from_env

    cache = cache_from_env(args.folder or DEFAULT_CACHE_FOLDER, ignore_off=True)
    try:
        return _cache_command(args, cache)
    except OSError as e:  # e.g. a folder this user may not read
        raise LoraxError(f"cannot read the SVD cache folder ({e.strerror or e}); check its permissions, or point "
                         "--folder / LORAX_SVD_CACHE elsewhere", path=cache.folder) from None


def _cache_command(args, cache) -> int:
    from lorax.svd_cache import UNKNOWN_MODEL, cache_disabled, describe_bytes

    folder = cache.folder
    if args.action == "clear":
        if not os.path.isdir(folder):
            print(f"SVD cache {folder}: nothing to clear (the folder does not exist)")
            return 0
        if args.model and args.model not in {u.model for u in cache.models()} and \
                os.path.abspath(args.model) not in {u.model for u in cache.models()}:
            known = ", ".join(u.model for u in cache.models() if u.model != UNKNOWN_MODEL) or "none"
            raise LoraxError(f"the SVD cache in {folder} holds no entries recorded for this model; models it "
                             f"holds: {known}. Give the model's path as listed by `python -m lorax cache`",
                             path=args.model)
        removed, freed, kept = cache.clear(args.model)
        what = f"of {args.model} " if args.model else ""
        print(f"SVD cache {folder}: removed {removed} entries {what}({describe_bytes(freed)})"
              + (f"; kept {kept} entries another model shares" if kept else ""))
        return 0
    off = " — turned off (LORAX_SVD_CACHE=off): transfers neither read nor write it" if cache_disabled() and \
        not args.folder else ""
    entries = cache.entries()
    if not entries:
        exists = "empty" if os.path.isdir(folder) else "empty (the folder does not exist yet)"
        print(f"SVD cache {folder}: {exists}, limit {describe_bytes(cache.max_bytes)}{off}")
        return 0
    total = sum(size for _, size, _ in entries)
    print(f"SVD cache {folder}: {describe_bytes(total)} in {len(entries)} entries, limit "
          f"{describe_bytes(cache.max_bytes)} (least recently used go first){off}")
    print(f"{'size':>10}  {'entries':>7}  {'last used':<16}  model")
    for u in cache.models():
        shared = f" ({u.shared} shared with other models)" if u.shared else ""
        print(f"{describe_bytes(u.bytes):>10}  {u.entries:>7}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(u.last_used)):<16}"
              f"  {u.model}{shared}")
    return 0


def _layer_map_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer-map", choices=LAYER_MAP_MODES, default="similarity",
                   help="pair layers by role and similarity where block counts differ (default), or by name only")
    p.add_argument("--layer-map-file", help='JSON {"target key": "source key"} overriding the layer map')


def _cache_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the SVD cache (as LORAX_SVD_CACHE=off)")


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
    _cache_argument(s)
    s.set_defaults(func=cmd_similarity)

    t = sub.add_parser("transfer", help="move an adapter from the source model to the target model")
    t.add_argument("--source", required=True, help="the checkpoint the adapter was trained on")
    t.add_argument("--target", required=True, help="the checkpoint to move it to")
    t.add_argument("--adapter", required=True, help="a LoRA-X file or any LoRA/LyCORIS file ComfyUI reads")
    t.add_argument("--out", required=True, help="where to write the transferred kohya LoRA (.safetensors); "
                                                 "never one of the inputs, and no existing file unless --overwrite")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input file)")
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
    _cache_argument(t)
    t.set_defaults(func=cmd_transfer)

    c = sub.add_parser("convert", help="turn an ordinary LoRA into a LoRA-X adapter on its source model")
    c.add_argument("--source", required=True, help="the checkpoint the LoRA was trained on")
    c.add_argument("--adapter", required=True, help="any LoRA/LyCORIS file ComfyUI reads")
    c.add_argument("--out", required=True, help="where to write the LoRA-X file (.safetensors); never one of "
                                                 "the inputs, and no existing file unless --overwrite")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input file)")
    c.add_argument("--rank", type=int, default=DEFAULT_RANK, help="r per layer (capped at the layer's rank)")
    c.add_argument("--exact", action="store_true", help="full float64 SVD instead of the Gram route")
    _cache_argument(c)
    c.set_defaults(func=cmd_convert)

    k = sub.add_parser("cache", help="list the SVD cache by model, or clear it",
                       description="The SVD cache keeps the factors of every weight decomposed, so the next "
                                   "transfer onto the same model decomposes nothing. `list` shows its size per "
                                   "model and when each was last used; `clear` removes it, or with --model one "
                                   "model's entries (those another model shares are kept).")
    k.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    k.add_argument("--model", help="with clear: only this model's entries (its path as `list` shows it)")
    k.add_argument("--folder", help=f"the cache folder (default: LORAX_SVD_CACHE, else {DEFAULT_CACHE_FOLDER}; "
                                    "the nodes' cache is lorax-svd-cache in ComfyUI's user folder)")
    k.set_defaults(func=cmd_cache)

    add_parsers(sub, _layer_map_arguments)  # scan, transfer-many (a LoRA library at once)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    # Nothing here trains: ComfyUI's loaders hand out parameters that require grad, and autograd
    # would record every Gram matrix for a backward pass that never comes (measured on the demo
    # SD1.5 pair with a LoRA on 70 layers, no cache: peak RSS 3.9 GB with it, 1.7 GB without;
    # identical output files). Scoped, not process-wide: main() also runs inside other programs
    # (the tests, the batch code), whose grad mode it must leave as it found it.
    try:
        with torch.no_grad():
            return args.func(args)
    except LoraxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "no ComfyUI found" in str(e):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
