"""A folder of LoRAs against one target checkpoint: the library scan and the batch transfer.

Both run the very code one file runs — :func:`~nodes.transfer_job.run_transfer` and
:func:`~nodes.transfer_job.save_transfer` on the host's own key maps and LoRA parser — so a
row of the scan says what LoRA-X Load/Transfer say for that file, and a batch output is the file
``python -m lorax transfer`` writes.

The scan reads an ordinary LoRA by its header: module names, shapes, and only the tensors of a
few elements (alphas, scales) that the host's parser reads values of. That is all the verdict
needs: which layers the modules map onto, which of those exist in the target with the same
shape, and how similar the source and target layers are — never the LoRA's own numbers. The
transfer then runs on zero deltas of the right shapes (:class:`HeaderAdapter`), so its decisions
and verdict are Transfer's own, without reading or materialising a LoRA of hundreds of MB.
LoRA-X adapters are small (r numbers a layer) and are read whole, as are pickled ``.pt``/``.ckpt``
files, which cannot be read in part.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Callable

import torch

from lorax.delta import Delta
from lorax.errors import LoraxError
from lorax.fused import WeightSlice, with_slices
from lorax.library_scan import (BatchRow, ScanRow, complete_output, kept_cosine, phi_stats, provenance_settings,
                                verdict_level)
from lorax.adapter_check import check_adapter_header
from lorax.report import how_counts
from lorax.safetensors_io import check_safetensors_file, ensure_finite, open_safetensors, read_tensor
from lorax.transfer import Decision, TransferSettings
from lorax.verdict import Verdict, guess_architecture

from . import bridge
from .handles import AdapterHandle
from .transfer_job import TE_PREFIXES, run_transfer, save_transfer

#: Tensors up to this many elements are read (alphas, DoRA scales of tiny layers); larger ones by shape.
_READ_UP_TO = 16
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_KINDS = ((".hada_w1_a", "LoHa"), (".lokr_w1", "LoKr"), (".oft_", "OFT"), (".diff", "full diff"),
          (".dora_scale", "DoRA"), (".lora_mid.", "LoCon"))
#: Layers whose factors a transfer asked the engine for.
_DECOMPOSED = (Decision.TRANSFERRED, Decision.LOW_SIMILARITY)


def read_by_header(path: str) -> dict[str, torch.Tensor]:
    """A safetensors adapter as the host's parser needs it: scalars read, the rest as ``meta``
    tensors (shape and dtype only, no data)."""
    header = check_safetensors_file(path)
    check_adapter_header(header, path)
    out: dict[str, torch.Tensor] = {}
    with open_safetensors(path) as f:
        for key in f.keys():
            info = header[key]
            if math.prod(info["shape"]) <= _READ_UP_TO:
                out[key] = read_tensor(f, key, path)
            else:
                out[key] = torch.empty(info["shape"], dtype=_DTYPES.get(info["dtype"], torch.float32), device="meta")
    ensure_finite({k: t for k, t in out.items() if t.device.type != "meta"}, path)
    if not out:
        raise LoraxError("the adapter file holds no tensors", path=path)
    return out


def adapter_kind(names) -> str:
    """What format a file's tensor names say it is (for the scan table)."""
    for suffix, kind in _KINDS:
        if any(suffix in n for n in names):
            return kind
    return "LoRA"


class HeaderAdapter(AdapterHandle):
    """An ordinary adapter read by its header (:func:`read_by_header`) whose deltas are zeros of
    the right shapes: the transfer's decisions, scores and verdict depend on layer names, shapes
    and the two models only, so a transfer of these is Transfer's verdict for the file."""

    @staticmethod
    def open_header(name: str, path: str) -> "HeaderAdapter":
        return HeaderAdapter(name=name, path=path, kind="lora", content=read_by_header(path))

    def deltas_for(self, patcher, engine, clip=None) -> bridge.AdapterDeltas:
        # The mapping part of bridge.ordinary_adapter_deltas, on the same host parse.
        result, layers = bridge.adapter_layers(self.content, patcher, path=self.path, clip=clip)
        for name, shape, _source, function, patch in layers:
            if function is None and getattr(patch, "name", None) == "lora":
                try:  # the factor-shape check a real transfer makes, on shapes only
                    bridge.lora_factors(patch, name, torch.empty(shape, device="meta"))
                except LoraxError as e:
                    raise LoraxError(e.detail, path=self.path, key=name) from None
            m, n = shape[0], math.prod(shape[1:])
            result.deltas[name] = Delta.factored(shape, torch.zeros(m, 1, dtype=torch.float64),
                                                 torch.zeros(1, n, dtype=torch.float64))
        return result


def open_for_scan(name: str, path: str) -> AdapterHandle:
    """The cheapest faithful read of an adapter file (module docstring)."""
    from lorax.lorax_adapter import is_lorax_file

    if not os.path.isfile(path):
        raise LoraxError("file not found", path=path)
    if path.endswith((".pt", ".ckpt", ".bin", ".pth")):
        return AdapterHandle.open(name, path)
    check_safetensors_file(path)
    if is_lorax_file(path):
        return AdapterHandle.open(name, path)
    return HeaderAdapter.open_header(name, path)


def names_verdict(handle: AdapterHandle, target_model, architecture: str | None) -> tuple[Verdict, str | None]:
    """The verdict's key-map part against ``target_model`` (no source, no SVD), and for a LoRA-X
    adapter made on another checkpoint the reason LoRA-X Load refuses it there (else None). An
    adapter that maps nothing raises the same error LoRA-X Load gives for it."""
    kind = bridge.model_kind(target_model)
    if handle.kind == "lorax":
        sigmas = handle.content.sigmas
        key_map = bridge.adapter_key_map(target_model)
        weights = with_slices(bridge.PatcherWeights(target_model))
        unmapped, other_source = [], None
        for module in sigmas:
            target = key_map.get(module)
            if target is None:
                unmapped.append(module)
                continue
            key, offset, _ = bridge.host_target(target)
            name = key if offset is None else WeightSlice(key, *offset).name
            if weights.shape(name) is None:
                unmapped.append(module)
            elif other_source is None:
                try:  # LoRA-X Load accepts only the adapter's own source (weight fingerprints)
                    handle.content.check_source(module, weights.weight(name))
                except LoraxError as e:
                    other_source = e.detail
        if len(unmapped) == len(sigmas):
            raise bridge.no_fit_error(kind, len(sigmas), dict.fromkeys(sigmas, torch.empty(0)), path=handle.path)
        return Verdict(target=kind, modules=len(sigmas), mapped=len(sigmas) - len(unmapped),
                       unmapped_example=unmapped[0] if unmapped else None,
                       architecture=architecture), other_source
    if not isinstance(handle, HeaderAdapter):  # a pickled file, read whole
        handle = HeaderAdapter(name=handle.name, path=handle.path, kind="lora", content=handle.content)
    deltas = handle.deltas_for(target_model, None)
    te = [m for m in deltas.unmapped if m.startswith(TE_PREFIXES)]
    other = [m for m in deltas.unmapped if m not in te]
    modules = deltas.modules - len(te)
    return Verdict(target=kind, modules=modules, mapped=max(0, modules - len(other)),
                   unmapped_example=other[0] if other else None, architecture=architecture,
                   text_encoder_skipped=len(te)), None


_ALL = re.compile(r"all (\d+) adapter modules map")
_SOME = re.compile(r"(\d+) of (\d+) adapter modules")
_NONE = re.compile(r"(?:none of the adapter's (\d+) modules|the adapter's only module)")


def _counts_of(line: str) -> tuple[int | None, int | None]:
    """(modules, mapped) as the verdict line states them."""
    if m := _ALL.search(line):
        return int(m.group(1)), int(m.group(1))
    if m := _SOME.search(line):
        return int(m.group(2)), int(m.group(1))
    if m := _NONE.search(line):
        return (int(m.group(1)) if m.group(1) else 1), 0
    return None, None


def scan_file(name: str, path: str, target_model, *, source_model=None, settings: TransferSettings | None = None,
              engine=None, layer_map_mode: str = "similarity", user_map=None) -> ScanRow:
    """One row of the library scan (see the module docstring); never raises for a bad file."""
    settings = settings or TransferSettings()
    row = ScanRow(file=name)
    try:
        handle = open_for_scan(name, path)
        if handle.kind == "lorax":
            row.kind = "LoRA-X"
            row.architecture = guess_architecture(dict.fromkeys(handle.content.sigmas, torch.empty(0)))
        else:
            row.kind = adapter_kind(handle.content)
            row.architecture = guess_architecture(handle.content)
        if source_model is None:
            verdict, other_source = names_verdict(handle, target_model, row.architecture)
            row.level, row.verdict = verdict.level, verdict.names_line()
            if other_source:
                row.verdict += (" It is a LoRA-X adapter of another checkpoint, which LoRA-X Load refuses here ("
                                f"{other_source}); give its source to move it.")
            row.modules, row.mapped = verdict.modules, verdict.mapped
        else:
            transfer = run_transfer(source_model, target_model, handle, settings, engine,
                                    layer_map_mode=layer_map_mode, user_map=user_map)
            row.verdict, row.level = transfer.verdict, verdict_level(transfer.verdict)
            row.modules, row.mapped = _counts_of(transfer.verdict)
            row.phi_median, row.phi_min, row.compared, row.passed = phi_stats(transfer.rows)
            row.moved = ", ".join(f"{n} {h}" for h, n in how_counts(transfer.rows).items())
            row.cos_kept = kept_cosine(transfer.rows)
    except LoraxError as e:
        if e.detail.startswith("Verdict: does not fit"):
            row.level, row.verdict = "does not fit", e.detail
            row.modules, row.mapped = _counts_of(e.detail)
        else:
            row.level, row.error = "error", str(e)
    except Exception as e:  # a file the host's parser chokes on is one bad row, not a failed scan
        row.level, row.error = "error", f"file '{path}': {type(e).__name__}: {e}"
    return row


Progress = Callable[[int, int], None]


def transfer_file(name: str, path: str, out_path: str, source_model, target_model, settings: TransferSettings,
                  engine, *, strength: float = 1.0, overwrite: bool = False, layer_map_mode: str = "similarity",
                  user_map=None, progress: Progress | None = None) -> BatchRow:
    """Transfer one file of a batch and write it atomically, unless a complete output of the
    same settings is there already. Errors are returned in the row, not raised."""
    t0 = time.perf_counter()
    basename = os.path.basename(path)
    why = "--overwrite" if overwrite else complete_output(out_path, basename, provenance_settings(settings, strength))
    if why is None:
        return BatchRow(file=name, output=str(out_path), status="skipped", why="complete output exists")
    try:
        handle = AdapterHandle.open(basename, path)
        transfer = run_transfer(source_model, target_model, handle, settings, engine, strength=strength,
                                progress=progress, layer_map_mode=layer_map_mode, user_map=user_map)
        written = save_transfer(transfer, out_path, bake_strength=True)
    except LoraxError as e:
        return BatchRow(file=name, output=str(out_path), status="failed", error=str(e), why=why,
                        seconds=time.perf_counter() - t0)
    except Exception as e:  # a damaged or foreign file must not stop the batch
        return BatchRow(file=name, output=str(out_path), status="failed", error=f"file '{path}': "
                        f"{type(e).__name__}: {e}", why=why, seconds=time.perf_counter() - t0)
    touched = [("source", l.key) for l in transfer.result.layers if l.decision in _DECOMPOSED]
    touched += [("target", l.target) for l in transfer.result.layers if l.decision in _DECOMPOSED]
    return BatchRow(file=name, output=str(out_path), status="written", verdict=transfer.verdict,
                    layers_written=written, summary=transfer.result.summary(), why=why,
                    seconds=time.perf_counter() - t0, touched=touched)


class _UnionAdapter(AdapterHandle):
    """Zero deltas of many header-read files at once (:func:`decompose_for_batch`)."""

    def deltas_for(self, patcher, engine, clip=None) -> bridge.AdapterDeltas:
        return bridge.AdapterDeltas(deltas=dict(self.content), modules=len(self.content))


def decompose_for_batch(jobs, source_model, target_model, settings: TransferSettings, engine, *,
                        layer_map_mode: str = "similarity", user_map=None) -> dict[int, str]:
    """Decompose, once each, every layer the files of a batch will ask the engine for, so that
    workers sharing its cache decompose nothing; returns {job index: error} for the files found
    unusable on the way (damaged, foreign), which need not be sent out.

    The ordinary LoRAs' zero deltas (by header) are pooled into one transfer: it asks for the union
    of their layers at the batch's rank — what each file's transfer asks for — and reads each
    layer's factors once, where one transfer per file would read a layer once per file that
    touches it. LoRA-X adapters, whose rank is their own r, are transferred one by one after
    (with zero deltas' worth of reading: they are small).
    """
    errors: dict[int, str] = {}
    pooled: dict[str, Delta] = {}
    lorax_files = []
    for i, (name, path, _out) in enumerate(jobs):
        try:
            handle = open_for_scan(name, path)
            if handle.kind == "lorax":
                lorax_files.append((i, name, path))
                continue
            if not isinstance(handle, HeaderAdapter):  # a pickled file, read whole
                handle = HeaderAdapter(name=handle.name, path=handle.path, kind="lora", content=handle.content)
            deltas = handle.deltas_for(source_model, engine)
            if not deltas.deltas and not deltas.unsupported:
                raise bridge.no_fit_error(bridge.model_kind(target_model), deltas.modules, path=path)
            pooled.update(deltas.deltas)
        except LoraxError as e:
            errors[i] = str(e)
        except Exception as e:
            errors[i] = f"file '{path}': {type(e).__name__}: {e}"
    if pooled:
        union = _UnionAdapter(name="the batch's LoRAs", path="", kind="lora", content=pooled)
        run_transfer(source_model, target_model, union, settings, engine, layer_map_mode=layer_map_mode,
                     user_map=user_map)
    for i, name, path in lorax_files:
        row = scan_file(name, path, target_model, source_model=source_model, settings=settings, engine=engine,
                        layer_map_mode=layer_map_mode, user_map=user_map)
        if row.level == "error":
            errors[i] = row.error
    return errors
