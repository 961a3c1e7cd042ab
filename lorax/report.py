"""Readable per-layer reports: block and family names, a summary line, and a text table.

Layers are grouped the way users think of a model: UNet blocks in order (input, middle,
output), or a DiT's own blocks (double/single, joint…), and within a block by layer family
(``attn1.to_q``, ``attn2.to_k``, ``ff``, ``proj_in``…).
"""

from __future__ import annotations

import re
import statistics
from typing import Iterable, Mapping

_PREFIXES = ("diffusion_model.", "model.diffusion_model.")
#: The decision a similarity report gives a layer that a transfer would move.
PASSES = "passes threshold"
_BLOCK_ORDER = {"input_blocks": 0, "down_blocks": 0, "middle_block": 1, "mid_block": 1, "output_blocks": 2,
                "up_blocks": 2, "double_blocks": 3, "joint_blocks": 3, "transformer_blocks": 3,
                "single_blocks": 4, "single_transformer_blocks": 4}


def short_key(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    return key[:-len(".weight")] if key.endswith(".weight") else key


def block_of(key: str) -> str:
    """``input_blocks.4``, ``middle_block``, ``double_blocks.3``… (the first numbered group)."""
    parts = short_key(key).split(".")
    if len(parts) >= 2 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def family_of(key: str) -> str:
    """``attn1.to_q``, ``attn2.to_out``, ``ff``, ``proj_in``, ``img_attn.qkv``… (the layer's role)."""
    parts = short_key(key).split(".")
    for i, p in enumerate(parts):
        if re.fullmatch(r"attn\d?|attn|img_attn|txt_attn|self_attn|cross_attn", p) and i + 1 < len(parts):
            return f"{p}.{parts[i + 1]}"
        if p in ("ff", "mlp", "img_mlp", "txt_mlp", "feed_forward"):
            rest = [q for q in parts[i + 1:] if q not in ("net", "proj")]
            return ".".join([p] + rest)
    return parts[-1] if not parts[-1].isdigit() else ".".join(parts[-2:])


def block_sort_key(block: str):
    name, _, num = block.partition(".")
    return (_BLOCK_ORDER.get(name, 5), name, int(num) if num.isdigit() else -1)


def summary_line(rows: list[Mapping], threshold: float | None = None) -> str:
    """E.g. "412 of 700 layers transferred, median Φ 0.93, lowest: output_blocks.5 attn2.to_k 0.41"."""
    scored = [r for r in rows if r.get("phi") is not None]
    parts = []
    if any(r.get("decision") == PASSES for r in rows):
        done = sum(1 for r in rows if r.get("decision") == PASSES)
        parts.append(f"{done} of {len(rows)} layers pass the threshold")
    elif any("decision" in r for r in rows):
        done = sum(1 for r in rows if r.get("decision") == "transferred")
        parts.append(f"{done} of {len(rows)} layers transferred")
    else:
        parts.append(f"{len(rows)} layers compared")
    if scored:
        parts.append(f"median Φ {statistics.median(r['phi'] for r in scored):.3f}")
        low = min(scored, key=lambda r: r["phi"])
        parts.append(f"lowest: {block_of(low['key'])} {family_of(low['key'])} {low['phi']:.3f}")
    if threshold is not None:
        parts.append(f"threshold Φ̂ ≥ {threshold:g} (chance-normalised, both sides)")
    return ", ".join(parts)


def text_report(rows: list[Mapping], *, title: str, threshold: float | None = None,
                notes: Iterable[str] = ()) -> str:
    """A fixed-width table, blocks in model order, with the summary first."""
    lines = [title, summary_line(rows, threshold)]
    lines.extend(notes)
    lines.append("Φ: subspace similarity (1 = same); Φ̂ = (Φ − chance)/(1 − chance), 0 = no better than chance.")
    lines.append("")
    header = f"{'block':<18} {'layer':<16} {'Φ':>6} {'Φ̂ L':>6} {'Φ̂ R':>6} {'k':>4}  {'kept':>5}  decision"
    lines.append(header)
    lines.append("-" * len(header))
    for r in sorted(rows, key=lambda r: (block_sort_key(block_of(r["key"])), short_key(r["key"]))):
        phi = "" if r.get("phi") is None else f"{r['phi']:.3f}"
        hl = "" if r.get("phi_hat") is None else f"{r['phi_hat']:.3f}"
        hr = "" if r.get("phi_hat_right") is None else f"{r['phi_hat_right']:.3f}"
        k = r.get("rank", r.get("k"))
        kept = "" if r.get("energy_kept") is None else f"{100 * r['energy_kept']:.0f}%"
        lines.append(f"{block_of(r['key']):<18} {family_of(r['key']):<16} {phi:>6} {hl:>6} {hr:>6} "
                     f"{'' if k is None else k:>4}  {kept:>5}  {r.get('decision', '')}")
    return "\n".join(lines)
