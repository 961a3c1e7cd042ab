"""``python -m lorax scan`` and ``python -m lorax transfer-many``: a folder of LoRAs against one target.

``scan`` tells, per file, what it was made for and how it fits the target (with a source: how
similar the layers it touches are); ``transfer-many`` moves them all. Both load the checkpoints
once and share one SVD engine over every file, so each layer of the two checkpoints is
decomposed at most once for the whole folder (and not at all when the SVD cache has it): the
engine's memo answers repeats within the run, the on-disk cache repeats across runs. Should
the cache be switched off (``LORAX_SVD_CACHE=off``), the batch keeps its factors in a temporary
cache folder for the run, so the memo's size bound cannot make it decompose a layer twice.

``--ray`` hands the per-file work to Ray (:mod:`lorax_cli.ray_batch`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from lorax.errors import LoraxError
from lorax.library_scan import (adapter_files, batch_table, distinct_layers, output_path, scan_csv, scan_json,
                                scan_table)
from lorax.transfer import DEFAULT_MODE, DEFAULT_RANK, DEFAULT_THRESHOLD, MODES, TransferSettings

from .common import backend, batch_engine, check_inputs, check_output, read_user_map, same_file


def settings_of(args) -> TransferSettings:
    return TransferSettings(rank=args.rank, threshold=args.threshold, mode=args.mode, shape_rule=args.shape_rule,
                            cross_attention_kv=not args.no_cross_attention_kv)


def _files(folder: str) -> list[Path]:
    """The folder's adapter files, LoRA-X adapters last: an ordinary LoRA's layers are
    decomposed at the batch's rank k, a LoRA-X adapter's at its own r (usually smaller), and the
    engine answers a smaller k from a larger decomposition but not the other way round — so this
    order decomposes each layer once where the other would do it twice."""
    from lorax.lorax_adapter import is_lorax_file

    def is_lorax(path: Path) -> bool:
        try:
            return path.suffix == ".safetensors" and is_lorax_file(path)
        except LoraxError:
            return False  # damaged: its row will say so

    files = adapter_files(folder)
    if not files:
        raise LoraxError("no LoRA files (.safetensors, .pt, .ckpt…) in this folder", path=folder)
    return sorted(files, key=is_lorax)  # stable: name order within each group


def _name(path: Path, root: str) -> str:
    return str(path.resolve().relative_to(Path(root).resolve()))


class _StopRequest:
    """Ctrl-C during a batch stops it between two steps of a transfer, not inside one.

    Python raises KeyboardInterrupt wherever the main thread happens to be, and inside torch or
    safetensors calls it can come out as another exception (measured: a ``ValueError`` from a
    tensor being built), which the batch then recorded as a failed file before going on with the
    next, or which the SVD cache took for a damaged entry. So the first Ctrl-C only asks to stop;
    the batch checks after every group of layers and every file (:meth:`check`) and raises
    KeyboardInterrupt there. A second Ctrl-C stops at once, as usual.
    """

    def __init__(self):
        self.requested = False
        self._before = None

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._before = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._before)
        print("\nLoRA-X: stopping after the current layers (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._before is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._before)


def _file_progress(i: int, n: int, name: str, stop: _StopRequest | None = None):
    def update(done: int, total: int) -> None:
        if stop is not None:
            stop.check()
        if sys.stderr.isatty():
            print(f"\r[{i}/{n}] {name}: {done}/{total} layers\033[K", end="", file=sys.stderr)
    return update


def cmd_scan(args) -> int:
    paths = [args.target] + ([args.source] if args.source else [])
    check_inputs(*paths)
    if args.source and same_file(args.source, args.target):
        raise LoraxError("source and target are the same file; the target must be a different checkpoint")
    files = _files(args.loras)
    inputs = {"--target": args.target, "--source": args.source, "--layer-map-file": args.layer_map_file,
              **{f"the LoRA {_name(p, args.loras)}": str(p) for p in files}}
    for flag in ("--json", "--csv"):  # reports, rewritten on every run: only the inputs are protected
        if getattr(args, flag[2:]):
            check_output(getattr(args, flag[2:]), inputs, overwrite=True, flag=flag)
    settings = TransferSettings(rank=args.rank, threshold=args.threshold)
    be = backend()
    t0 = time.perf_counter()
    target = be.load_model(args.target)
    source = be.load_model(args.source) if args.source else None
    user_map = read_user_map(args.layer_map_file)
    rows = []
    with batch_engine(args.exact) as engine:
        for i, path in enumerate(files, 1):
            name = _name(path, args.loras)
            if sys.stderr.isatty():
                print(f"\r[{i}/{len(files)}] {name}\033[K", end="", file=sys.stderr)
            rows.append(be.scan_file(name, str(path), target, source_model=source, settings=settings, engine=engine,
                                     layer_map_mode=args.layer_map, user_map=user_map))
        if sys.stderr.isatty():
            print(file=sys.stderr)
        title = (f"LoRA library {args.loras} against {os.path.basename(args.target)}"
                 + (f" (source {os.path.basename(args.source)}, threshold Φ̂ ≥ {args.threshold:g})" if args.source
                    else " (names only: give --source to score the layers)"))
        print(scan_table(rows, title=title, with_phi=source is not None))
        print(f"time: {time.perf_counter() - t0:.1f} s; SVD: {engine.stats.layers_decomposed} layers decomposed")
    if args.json:
        Path(args.json).write_text(scan_json(rows))
    if args.csv:
        Path(args.csv).write_text(scan_csv(rows))
    return 0


def cmd_transfer_many(args) -> int:
    settings = settings_of(args)
    check_inputs(args.source, args.target)
    if same_file(args.source, args.target):
        raise LoraxError("source and target are the same file; the target must be a different checkpoint")
    files = _files(args.loras)
    jobs = [(_name(p, args.loras), str(p), str(output_path(p, args.loras, args.out, args.target))) for p in files]
    _check_outputs(jobs, {"--source": args.source, "--target": args.target, "--layer-map-file": args.layer_map_file})
    user_map = read_user_map(args.layer_map_file)
    t0 = time.perf_counter()
    if args.ray is not None:
        from .ray_batch import run_on_ray

        rows, stats_line = run_on_ray(jobs, args, settings, user_map)
    else:
        rows, stats_line = run_local(jobs, args, settings, user_map)
    print(batch_table(rows))
    seconds = time.perf_counter() - t0
    done = sum(r.status == "written" for r in rows)
    print(f"{stats_line}; total {seconds:.1f} s, {60 * done / seconds:.1f} files written per minute")
    return 1 if any(r.status == "failed" for r in rows) else 0


def _check_outputs(jobs, inputs: dict) -> None:
    """No output of the batch may be one of its inputs — the checkpoints, the map, or a LoRA of the
    folder (with ``--out`` inside ``--loras``, an earlier run's output is both) — whatever the flags.
    The test is ``os.path.samefile``'s (device and inode, so hard links and symlinks count), with
    each input stat'ed once: a library of n files costs 2n stats, not n²."""
    named = {**inputs, **{f"the LoRA {name}": path for name, path, _ in jobs}}
    identity = {}
    for what, path in named.items():
        if path and os.path.exists(path):
            st = os.stat(path)
            identity.setdefault((st.st_dev, st.st_ino), what)
    for name, _, out in jobs:
        if not os.path.exists(out):
            continue
        st = os.stat(out)
        what = identity.get((st.st_dev, st.st_ino))
        if what is not None:
            raise LoraxError(f"the output for {name} would be the same file as {what}; nothing was written. "
                             "The command line never writes over one of its inputs: give --out a folder "
                             "outside --loras", path=out)


def run_local(jobs, args, settings, user_map):
    """Every file in this process, on one engine (module docstring)."""
    be = backend()
    source, target = be.load_model(args.source), be.load_model(args.target)
    rows = []
    with batch_engine(args.exact) as engine, _StopRequest() as stop:
        for i, (name, path, out) in enumerate(jobs, 1):
            row = be.transfer_file(name, path, out, source, target, settings, engine, strength=args.strength,
                                   overwrite=args.overwrite, layer_map_mode=args.layer_map, user_map=user_map,
                                   progress=_file_progress(i, len(jobs), name, stop))
            stop.check()  # also when the file ended in an error the interruption caused
            if sys.stderr.isatty():
                print(file=sys.stderr)
            print(f"[{i}/{len(jobs)}] {row.status}: {name}" + (f" -> {row.output}" if row.status == "written" else "")
                  + (f" ({row.error})" if row.error else ""), flush=True)
            rows.append(row)
        stats = engine.stats
        line = (f"SVD: {stats.layers_decomposed} layers decomposed for {distinct_layers(rows)} distinct layers "
                f"touched by {sum(r.status == 'written' for r in rows)} transfers "
                f"({stats.memory_hits} memo hits, {stats.disk_hits} cache hits)")
    return rows, line


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="the checkpoint the LoRAs should work on")
    p.add_argument("--loras", required=True, help="folder of LoRA files (searched recursively)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--exact", action="store_true", help="full float64 SVD instead of the Gram route")


def add_parsers(sub, layer_map_arguments) -> None:
    """The ``scan`` and ``transfer-many`` subcommands (called by :func:`lorax_cli.cli.build_parser`)."""
    s = sub.add_parser("scan", help="which LoRAs of a folder fit a checkpoint (one row per file)")
    _common(s)
    s.add_argument("--source", help="the checkpoint the LoRAs were made for: adds Φ̂ of the layers they touch")
    s.add_argument("--json", help="also write the rows as JSON to this file")
    s.add_argument("--csv", help="also write the rows as CSV to this file")
    layer_map_arguments(s)
    s.set_defaults(func=cmd_scan)

    t = sub.add_parser("transfer-many", help="move every LoRA of a folder from the source to the target")
    t.add_argument("--source", required=True, help="the checkpoint the LoRAs were trained on")
    _common(t)
    t.add_argument("--out", required=True, help="folder for the outputs (<lora>-on-<target>.safetensors)")
    t.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)
    t.add_argument("--shape-rule", choices=("skip", "paired"), default="skip")
    t.add_argument("--strength", type=float, default=1.0, help="baked into the written files")
    t.add_argument("--no-cross-attention-kv", action="store_true",
                   help="leave the cross-attention to_k/to_v layers out")
    t.add_argument("--overwrite", action="store_true", help="redo files whose complete output exists")
    t.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the files as Ray tasks: a local Ray (no ADDRESS) or the cluster at ADDRESS "
                        "('auto', 'ray://host:10001'); needs the optional 'ray' extra")
    t.add_argument("--workers", type=int, default=2, help="Ray workers for a local Ray (default 2)")
    t.add_argument("--ray-stall-minutes", type=float, default=30,
                   help="give up on the Ray tasks left when none has finished for this long (default 30)")
    layer_map_arguments(t)
    t.set_defaults(func=cmd_transfer_many)
