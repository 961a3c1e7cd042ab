"""A LoRA library at once: the scan table and the batch transfer's bookkeeping (no host here).

Users switch to a new fine-tune or merge and ask which of their hundreds of LoRAs still fit and
whether the others can be moved. The host glue (``nodes/library.py``) reads each file and runs
the same verdict and transfer code as LoRA-X Load/Transfer; this module holds what does not need
the host, so the command line, the node and the Ray workers format and decide alike:

* which files of a folder are adapters (:func:`adapter_files`), and what a batch writes for each
  (:func:`output_path`: the name says the target, the folder layout is kept);
* one row per file (:class:`ScanRow`) and its table / JSON / CSV forms;
* whether an output already on disk is a complete result of the same settings
  (:func:`complete_output`), so an interrupted batch redoes only what is missing — outputs are
  written atomically, so a file at the output path is either whole or the damaged leftover of
  some other writer, which the container check catches;
* the batch's rows and its one summary table.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .errors import LoraxError
from .safetensors_io import check_safetensors_file

#: Files ComfyUI's LoRA loaders read (folder_paths' "loras" extensions that hold tensors).
ADAPTER_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin", ".pth", ".pt2", ".sft")
#: The verdict levels of :class:`lorax.verdict.Verdict`, plus a row whose file could not be used.
LEVELS = ("fits", "fits partly", "does not fit", "error")
_LEVEL = re.compile(r"^Verdict: (fits partly|fits|does not fit)\b")


def adapter_files(folder: str | os.PathLike) -> list[Path]:
    """Adapter files under ``folder`` (recursively, sorted), without hidden files and the
    ``.lorax-*.part`` temporaries an interrupted atomic write may leave."""
    root = Path(folder)
    if not root.is_dir():
        raise LoraxError("not a folder of LoRA files; give the folder that holds them", path=root)
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in ADAPTER_EXTENSIONS:
            out.append(path)
    return out


def output_path(adapter: str | os.PathLike, loras_dir: str | os.PathLike, out_dir: str | os.PathLike,
                target: str | os.PathLike) -> Path:
    """Where a batch writes the transfer of ``adapter``: its place under ``loras_dir`` mirrored
    under ``out_dir``, named ``<adapter>-on-<target checkpoint>.safetensors``."""
    rel = Path(adapter).resolve().relative_to(Path(loras_dir).resolve())
    target_stem = Path(target).name.split(".")[0]
    return Path(out_dir) / rel.parent / f"{rel.name.rsplit('.', 1)[0]}-on-{target_stem}.safetensors"


def provenance_settings(settings, strength: float) -> dict:
    """The settings a transfer's provenance records (``save_transfer``), for :func:`complete_output`."""
    return {"rank": settings.rank, "threshold": settings.threshold, "mode": settings.mode,
            "copy_below": settings.copy_below, "strength_baked": strength}


def complete_output(path: str | os.PathLike, adapter_name: str, settings: Mapping) -> str | None:
    """Why an existing output must be redone, or None when it is a complete transfer of
    ``adapter_name`` with these settings (missing files say "missing")."""
    if not os.path.exists(path):
        return "missing"
    try:
        header = check_safetensors_file(path)
    except LoraxError as e:
        return f"damaged ({e.detail})"
    raw = (header.get("__metadata__") or {}).get("lorax_provenance")
    try:
        provenance = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        provenance = None
    if not isinstance(provenance, dict) or provenance.get("source_adapter") != adapter_name:
        return "not a LoRA-X transfer of this adapter"
    changed = [k for k, v in settings.items() if provenance.get(k) != v]
    if changed:
        return f"written with other settings ({', '.join(changed)})"
    return None


def verdict_level(line: str) -> str:
    """``fits`` / ``fits partly`` / ``does not fit`` of a verdict line."""
    m = _LEVEL.match(line)
    if m is None:
        raise ValueError(f"not a verdict line: {line!r}")
    return m.group(1)


@dataclass
class ScanRow:
    """One LoRA file of a scan: what it was made for and how it fits the target.

    ``verdict`` is the line LoRA-X Transfer (with a source) or the key-map part of it (without
    one) prints for this file; ``phi_median``/``phi_min`` are over the min(left, right) Φ̂ of the
    layers it touches that were scored, ``passed`` of ``compared`` were moved (copied layers count as
    compared: they are moved without a score), ``moved`` says how and ``cos_kept`` how much of the
    adapter's change the moved layers keep.
    """

    file: str
    kind: str = ""                      # "LoRA", "LoRA-X", "LoHa", "LoKr", ... ("" when unreadable)
    architecture: str | None = None     # guess_architecture of its module names
    level: str = "error"
    verdict: str = ""
    modules: int | None = None
    mapped: int | None = None
    compared: int | None = None
    passed: int | None = None
    phi_median: float | None = None
    phi_min: float | None = None
    error: str | None = None
    moved: str = ""                     # how the passing layers were moved, e.g. "70 copied, 2 transported"
    cos_kept: float | None = None       # median cosine of the written deltas against the adapter's own

    def to_dict(self) -> dict:
        return asdict(self)


def phi_stats(rows: Iterable[Mapping]) -> tuple[float | None, float | None, int, int]:
    """(median Φ̂, lowest Φ̂, compared, passed) over a transfer's per-layer rows; Φ̂ of a layer is
    the weaker of its left and right sides, as the threshold applies to both. A layer copied as it
    is (it barely moved) has no Φ̂ and counts as compared and passed."""
    phis, compared, passed = [], 0, 0
    for r in rows:
        copied = r.get("how") == "copied" and r.get("decision") == "transferred"
        sides = [x for x in (r.get("phi_hat"), r.get("phi_hat_right")) if x is not None]
        if not sides and not copied:  # not compared (or moved across shapes with no side in common)
            continue
        if sides:
            phis.append(min(sides))
        compared += 1
        passed += r.get("decision") == "transferred"
    if not compared:
        return None, None, 0, 0
    return (statistics.median(phis) if phis else None), (min(phis) if phis else None), compared, passed


def kept_cosine(rows: Iterable[Mapping]) -> float | None:
    """Median cosine of the moved layers' written deltas against the adapter's own (None: none moved)."""
    cos = [float(r["cos_kept"]) for r in rows if r.get("decision") == "transferred" and r.get("cos_kept") is not None]
    return statistics.median(cos) if cos else None


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _count(a: int | None, b: int | None) -> str:
    return "–" if a is None or b is None else f"{a}/{b}"


def scan_table(rows: Sequence[ScanRow], *, title: str = "", with_phi: bool = True) -> str:
    """The terminal/node table: one line per file, then the verdict lines (they are long)."""
    head = ["file", "made for", "verdict", "mapped"] + (["Φ̂ median", "Φ̂ min", "pass", "kept (cos)", "moved"]
                                                       if with_phi else [])
    body = []
    for r in rows:
        cells = [r.file, r.architecture or "?", r.level, _count(r.mapped, r.modules)]
        if with_phi:
            cells += [_fmt(r.phi_median), _fmt(r.phi_min), _count(r.passed, r.compared),
                      "–" if r.cos_kept is None else f"{r.cos_kept:.2f}", r.moved or "–"]
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = [title] if title else []
    lines.append("  ".join(str(c).ljust(w) for c, w in zip(head, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body]
    counts = {level: sum(r.level == level for r in rows) for level in LEVELS}
    lines.append("")
    lines.append(f"{len(rows)} files: " + ", ".join(f"{n} {level}" for level, n in counts.items() if n))
    lines.append("")
    for r in rows:
        lines.append(f"{r.file}: {r.verdict if r.level != 'error' else 'error: ' + (r.error or '')}")
    return "\n".join(lines)


def scan_json(rows: Sequence[ScanRow]) -> str:
    return json.dumps([r.to_dict() for r in rows], indent=1, ensure_ascii=False)


def scan_csv(rows: Sequence[ScanRow]) -> str:
    buf = io.StringIO()
    names = list(ScanRow.__dataclass_fields__)
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(r.to_dict())
    return buf.getvalue()


@dataclass
class BatchRow:
    """One file of a batch transfer."""

    file: str
    output: str
    status: str                         # "written" | "skipped" | "failed"
    verdict: str = ""
    layers_written: int | None = None
    summary: str = ""
    error: str | None = None
    seconds: float = 0.0
    why: str = ""                       # why it was (re)done or skipped
    touched: list = field(default_factory=list, repr=False)  # [(side, key)] layers whose factors it used

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("touched")
        return out


def batch_table(rows: Sequence[BatchRow]) -> str:
    """The one summary table a batch prints at the end."""
    head = ["file", "status", "verdict", "layers", "s"]
    body = []
    for r in rows:
        level = ""
        if r.verdict:
            try:
                level = verdict_level(r.verdict)
            except ValueError:
                level = ""
        body.append([r.file, r.status, level if r.status != "failed" else "error",
                     "–" if r.layers_written is None else str(r.layers_written), f"{r.seconds:.1f}"])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body]
    n = {s: sum(r.status == s for r in rows) for s in ("written", "skipped", "failed")}
    lines.append(f"{len(rows)} files: {n['written']} written, {n['skipped']} skipped (complete output exists), "
                 f"{n['failed']} failed")
    for r in rows:
        if r.status == "failed":
            lines.append(f"  failed: {r.file}: {r.error}")
    return "\n".join(lines)


def distinct_layers(rows: Iterable[BatchRow]) -> int:
    """Distinct (model, layer) pairs whose factors the batch's transfers used."""
    return len({tuple(t) for r in rows for t in r.touched})
