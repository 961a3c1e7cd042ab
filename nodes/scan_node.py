"""LoRA Library Scan: which LoRAs of a folder fit a checkpoint, one row per file."""

from __future__ import annotations

import os

import comfy.utils
import folder_paths

from lorax.library_scan import scan_json, scan_table
from lorax.report import cap_text
from lorax.transfer import DEFAULT_RANK, DEFAULT_THRESHOLD, TransferSettings

from .api import CATEGORY, io, output
from .runtime import get_engine

ALL = "(all of models/loras)"
#: The node view shows this much of the table; the ``table`` output keeps it whole.
_UI_TEXT_BYTES = 60_000


def lora_subfolders() -> list[str]:
    """``ALL`` and every subfolder of ComfyUI's ``loras`` folders that holds a LoRA file."""
    names = folder_paths.get_filename_list("loras")
    folders = {os.path.dirname(n).replace(os.sep, "/") for n in names}
    return [ALL] + sorted(f for f in folders if f)


def files_in(folder: str) -> list[tuple[str, str]]:
    """(name as ComfyUI lists it, full path) of the LoRA files in ``folder``, subfolders included."""
    out = []
    for name in folder_paths.get_filename_list("loras"):
        rel = name.replace(os.sep, "/")
        if folder == ALL or rel.startswith(folder.rstrip("/") + "/"):
            out.append((name, folder_paths.get_full_path("loras", name)))
    return out


class LoraxLibraryScan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraxLibraryScan",
            display_name="LoRA Library Scan",
            category=CATEGORY,
            description=("Checks every LoRA in a folder of models/loras against a checkpoint: what each was made "
                         "for, and the LoRA-X verdict (fits / fits partly / does not fit) LoRA-X Load and Transfer "
                         "would give it. With the source checkpoint connected it also scores the layers each LoRA "
                         "touches (median and lowest Φ̂, how many pass). Files are read by their header, not "
                         "loaded whole."),
            is_output_node=True,
            inputs=[
                io.Model.Input("target_model", tooltip="The checkpoint the LoRAs should work on."),
                io.Combo.Input("folder", options=lora_subfolders(),
                               tooltip="A subfolder of models/loras (its subfolders included), or all of it."),
                io.Model.Input("source_model", optional=True, tooltip=(
                    "The checkpoint the LoRAs were made for. Without it the verdict rests on the module names "
                    "alone; with it each LoRA's layers are compared as LoRA-X Transfer compares them.")),
                io.Int.Input("rank", default=DEFAULT_RANK, min=1, max=4096, optional=True,
                             tooltip="k for the similarity, as in LoRA-X Transfer (capped at half each layer's "
                                     "rank; LoRA-X adapters use their own r)."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Minimum Φ̂ (left and right) for a layer to pass, as in LoRA-X Transfer."),
            ],
            outputs=[
                output(io.String, "table", "The table as text, one row per file, then each file's verdict line."),
                output(io.String, "json", "The rows as JSON (file, kind, architecture, level, verdict, counts, "
                                          "Φ̂ median/min, error)."),
            ],
        )

    @classmethod
    def execute(cls, target_model, folder, source_model=None, rank=DEFAULT_RANK,
                threshold=DEFAULT_THRESHOLD) -> io.NodeOutput:
        from .library import scan_file
        from .transfer_job import check_distinct

        if source_model is not None:
            check_distinct(source_model, target_model)
        settings = TransferSettings(rank=rank, threshold=threshold)
        files = files_in(folder)
        bar = comfy.utils.ProgressBar(max(1, len(files)))
        engine = get_engine()
        rows = []
        for i, (name, path) in enumerate(files, 1):
            rows.append(scan_file(name, path, target_model, source_model=source_model, settings=settings,
                                  engine=engine))
            bar.update_absolute(i, len(files))
        title = (f"LoRA library '{folder}': {len(files)} files"
                 + (f", threshold Φ̂ ≥ {threshold:g}" if source_model is not None
                    else " (names only: connect the source model to score the layers)"))
        table = scan_table(rows, title=title, with_phi=source_model is not None) if rows else \
            f"{title}\nNo LoRA files in this folder."
        return io.NodeOutput(table, scan_json(rows), ui={"text": [cap_text(table, _UI_TEXT_BYTES)]})
