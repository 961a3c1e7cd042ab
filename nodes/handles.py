"""The objects that travel between LoRA-X nodes on the ``LORAX_ADAPTER`` / ``LORAX_TRANSFER`` links."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from lorax.errors import LoraxError
from lorax.lorax_adapter import LoraxAdapter
from lorax.transfer import TransferResult

from . import bridge

_FILE_MEMO: dict[tuple, tuple[str, Any]] = {}


@dataclass
class AdapterHandle:
    """An adapter file read once: a LoRA-X adapter, or an ordinary adapter's tensors."""

    name: str
    path: str
    kind: str                # "lorax" | "lora"
    content: Any             # LoraxAdapter | dict[str, Tensor]

    @staticmethod
    def open(name: str, path: str | None) -> "AdapterHandle":
        if path is None or not os.path.isfile(path):
            raise LoraxError(f"adapter '{name}' was not found in ComfyUI's 'loras' folders; put the file "
                             "there (or pick another) and refresh the node list", path=path or name)
        st = os.stat(path)
        memo_key = (path, st.st_mtime_ns, st.st_size)
        if memo_key not in _FILE_MEMO:
            _FILE_MEMO.clear()  # keep one file's tensors, not every file ever opened
            _FILE_MEMO[memo_key] = bridge.load_adapter_file(path)
        kind, content = _FILE_MEMO[memo_key]
        if kind == "lorax":
            content.path = path
        return AdapterHandle(name=name, path=path, kind=kind, content=content)

    def deltas_for(self, patcher, engine, clip=None) -> bridge.AdapterDeltas:
        """The adapter's deltas against ``patcher`` (its source model)."""
        if self.kind == "lorax":
            return bridge.lorax_adapter_deltas(self.content, patcher, engine, clip=clip)
        return bridge.ordinary_adapter_deltas(self.content, patcher, path=self.path, clip=clip)

    @property
    def description(self) -> str:
        if self.kind == "lorax":
            a: LoraxAdapter = self.content
            return f"LoRA-X adapter '{self.name}' ({len(a.sigmas)} layers, r = {a.rank})"
        return f"LoRA '{self.name}'"


@dataclass
class TransferHandle:
    """A finished transfer, ready to be saved as a standard LoRA file."""

    adapter: AdapterHandle
    result: TransferResult
    clip_result: TransferResult | None
    strength: float
    kohya_names: dict[str, str]
    base_model_version: str
    architecture: str
    target_kind: str
    skipped_text_encoder: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)   # JSON-ready per-layer rows (model and text encoder)
    report: str = ""                                 # the readable text report
    title: str = ""
    verdict: str = ""                                # the one-line compatibility verdict
    fused_shapes: dict[str, tuple] = field(default_factory=dict)  # target shapes of sliced fused weights
