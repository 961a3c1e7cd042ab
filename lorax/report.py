"""Readable per-layer reports: block and family names, a summary line, a text table, and the
compact per-block payload the nodes' in-graph view draws (``web/lorax.js``).

Layers are grouped the way users think of a model: UNet blocks in order (input, middle,
output), or a DiT's own blocks (Flux's, HunyuanVideo's and Chroma's double and single blocks, SD3's
joint blocks, Wan's ``blocks.N``, Qwen-Image's and LTX-Video's ``transformer_blocks.N``, Z-Image's
``layers.N`` after its noise and context refiners, HiDream's double and single stream blocks), and within
a block by layer family named after the model's own modules: ``attn1.to_q``, ``attn2.to_k``,
``ff.0``, ``proj_in`` in a UNet; ``img_attn.qkv``, ``txt_attn.proj``, ``img_mlp.0``, ``img_mod``
(modulation), ``linear1``, ``linear2``, ``modulation`` in Flux; ``x_block.attn.qkv``,
``context_block.mlp.fc1``, ``x_block.adaLN_modulation`` in SD3. A slice of a fused weight
(:mod:`lorax.fused`) is its own family: ``img_attn.qkv[q]``, ``linear1[mlp]``.
"""

from __future__ import annotations

import json
import re
import statistics
from typing import Iterable, Mapping, Sequence

from .fused import parse_slice_key

_PREFIXES = ("diffusion_model.", "model.diffusion_model.")
#: The decision a similarity report gives a layer that a transfer would move.
PASSES = "passes threshold"
TRANSFERRED = "transferred"
LOW_SIMILARITY = "skipped: similarity below threshold"
_BLOCK_ORDER = {"input_blocks": 0, "down_blocks": 0, "middle_block": 1, "mid_block": 1, "output_blocks": 2,
                "up_blocks": 2, "noise_refiner": 2.7, "context_refiner": 2.8, "double_blocks": 3, "joint_blocks": 3,
                "transformer_blocks": 3, "blocks": 3, "layers": 3, "double_stream_blocks": 3, "single_blocks": 4,
                "single_transformer_blocks": 4, "single_stream_blocks": 4}
#: Weights of a DiT outside its blocks: the inputs go before the blocks, the output layer after.
_DIT_INPUTS = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "x_embedder", "context_embedder",
               "t_embedder", "y_embedder", "pos_embed", "distilled_guidance_layer", "double_stream_modulation_img",
               "double_stream_modulation_txt", "single_stream_modulation", "patch_embedding", "text_embedding",
               "time_embedding", "time_projection", "img_emb", "time_text_embed", "cap_embedder", "patchify_proj",
               "adaln_single", "caption_projection", "p_embedder", "byt5_in", "vision_in", "cond_type_embedding")
_DIT_OUTPUTS = ("final_layer", "head", "norm_out", "proj_out")
#: SD3's two streams inside a joint block; families are named with the stream first.
_STREAMS = ("x_block", "context_block")
#: Modulation layers (adaLN): Flux's ``img_mod.lin`` / ``modulation.lin``, SD3's and Z-Image's
#: ``adaLN_modulation.N``, Flux.2's shared ``double_stream_modulation_img``…
_MODULATIONS = ("img_mod", "txt_mod", "modulation", "adaLN_modulation", "double_stream_modulation_img",
                "double_stream_modulation_txt", "single_stream_modulation")
#: Attention modules: UNets' ``attn1``, Flux's ``img_attn``, Wan's ``self_attn`` / ``cross_attn``,
#: Z-Image's ``attention``, LTX-2's audio and cross-modal attentions.
_ATTENTIONS = re.compile(r"attn\d?|img_attn|txt_attn|self_attn|cross_attn|attention|audio_attn\d"
                         r"|audio_to_video_attn|video_to_audio_attn")
#: Feed-forward modules: ``ff``, ``mlp``, Flux's ``img_mlp``, Wan's ``ffn``, Z-Image's ``feed_forward``,
#: HiDream's image / text streams ``ff_i`` / ``ff_t`` (a mixture of experts), LTX-2's ``audio_ff``.
_FEED_FORWARDS = ("ff", "mlp", "img_mlp", "txt_mlp", "feed_forward", "ffn", "ff_i", "ff_t", "audio_ff")
_TEXT_ENCODERS = ("clip_l", "clip_g", "clip_h", "t5xxl", "t5xl", "t5", "te", "te1", "te2", "text_encoder",
                  "text_encoder_2", "llama", "qwen")
_CONTAINERS = ("layers", "resblocks", "blocks", "block", "h")
_KOHYA_TE = re.compile(r"^lora_(te\d?)_.*?_(?:layers|resblocks)_(\d+)_(.+)$")
_KOHYA_TE_FAMILY = re.compile(r"^(self_attn|mlp|attn|ln_\d|layer_norm\d)_(.+)$")


def short_key(key: str) -> str:
    """The key without the model prefix and ``.weight`` (a slice keeps its brackets)."""
    part = parse_slice_key(key)
    if part is not None:
        return short_key(part.key) + key[len(part.key):]
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    return key[:-len(".weight")] if key.endswith(".weight") else key


def block_of(key: str) -> str:
    """``input_blocks.4``, ``middle_block``, ``double_blocks.3``, ``clip_l.layers.5``, ``time_embed``…

    The first numbered group of a block container (``*_blocks.N``, ``layers.N``…); a text
    encoder's layers group as ``<encoder>.layers.N``, also for the kohya module names of text-
    encoder layers an adapter carries but the graph could not transfer (``te.layers.N``).
    """
    k = short_key(key)
    m = _KOHYA_TE.match(k)
    if m:
        return f"{m.group(1)}.layers.{m.group(2)}"
    parts = k.split(".")
    if parts[0] in ("middle_block", "mid_block"):
        return parts[0]
    if len(parts) >= 2 and parts[1].isdigit() and (parts[0] in _BLOCK_ORDER or
                                                   parts[0].endswith(("blocks", "block", "layers", "refiner"))):
        return f"{parts[0]}.{parts[1]}"
    for i in range(1, len(parts) - 1):
        if parts[i] in _CONTAINERS and parts[i + 1].isdigit():
            return f"{parts[0]}.{parts[i]}.{parts[i + 1]}"
    if len(parts) >= 2 and parts[1].isdigit() and parts[0].startswith("lora_"):
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def family_of(key: str) -> str:
    """The layer's role, named by the model's own modules (module docstring): ``attn1.to_q``,
    ``ff.0``, ``img_attn.qkv``, ``img_mod``, ``linear1``, ``x_block.mlp.fc1``, ``img_attn.qkv[q]``…"""
    part = parse_slice_key(key)
    if part is not None:
        return f"{family_of(part.key)}[{part.part}]"
    k = short_key(key)
    m = _KOHYA_TE.match(k)
    if m:
        f = _KOHYA_TE_FAMILY.match(m.group(3))
        return f"{f.group(1)}.{f.group(2)}" if f else m.group(3)
    parts = k.split(".")
    stream = next((p + "." for p in parts if p in _STREAMS), "")
    for i, p in enumerate(parts):
        if p in _MODULATIONS:
            return stream + p
        if _ATTENTIONS.fullmatch(p) and i + 1 < len(parts):
            return f"{stream}{p}.{parts[i + 1]}"
        if p in _FEED_FORWARDS:
            rest = [q for q in parts[i + 1:] if q not in ("net", "proj")]
            return stream + ".".join([p] + rest)
    return parts[-1] if not parts[-1].isdigit() else ".".join(parts[-2:])


def block_sort_key(block: str):
    """Model order: UNet input, middle, output blocks (or a DiT's double, then single blocks),
    then other weights, then text-encoder layers; numbered blocks by number."""
    head, _, rest = block.partition(".")
    num = rest.rpartition(".")[2] if rest else ""
    if head in _BLOCK_ORDER:
        rank = _BLOCK_ORDER[head]
    elif head in _DIT_INPUTS:
        rank = 2.5
    elif head in _DIT_OUTPUTS:
        rank = 4.5
    elif head in _TEXT_ENCODERS or head.startswith(("clip", "t5", "text_encoder")):
        rank = 6
    else:
        rank = 5
    return (rank, head, rest.rpartition(".")[0], int(num) if num.isdigit() else -1)


_FAMILY_GROUPS = ("attn1", "attn", "attn2", "self_attn", "cross_attn", "attention", "audio_attn1", "audio_attn2",
                  "audio_to_video_attn", "video_to_audio_attn", "img_attn", "img_mlp", "img_mod", "txt_attn",
                  "txt_mlp", "txt_mod", "linear1", "linear2", "modulation", "ff", "ff_i", "ff_t", "ffn", "mlp",
                  "feed_forward", "audio_ff", "adaLN_modulation", "proj_in", "proj_out")
_FAMILY_MEMBERS = {"to_q": 0, "q_proj": 0, "q": 0, "qkv": 0, "to_k": 1, "k_proj": 1, "k": 1, "to_v": 2,
                   "v_proj": 2, "v": 2, "to_out": 3, "out_proj": 3, "o": 3, "proj": 4}
_SLICE_PARTS = {"q": 0, "k": 1, "v": 2, "mlp": 3}


def family_sort_key(family: str):
    """attn1 q/k/v/out, attn2 q/k/v/out, (DiT attentions, MLPs, modulations: image stream first,
    SD3's x_block before its context_block), ff / mlp, proj_in, proj_out, then the rest; slices of
    a fused weight in q, k, v, mlp order."""
    base, _, part = family.partition("[")
    head, _, tail = base.partition(".")
    stream = 0
    if head in _STREAMS:
        stream = 1 + _STREAMS.index(head)
        head, _, tail = tail.partition(".")
    group = _FAMILY_GROUPS.index(head) if head in _FAMILY_GROUPS else len(_FAMILY_GROUPS)
    member = _FAMILY_MEMBERS.get(tail.split(".")[0], 9) if tail else 0
    return (stream, group, member, _SLICE_PARTS.get(part.rstrip("]"), 9 if part else 0), family)


_BLOCK_LABELS = {"input_blocks": "in", "output_blocks": "out", "middle_block": "mid", "down_blocks": "down",
                 "mid_block": "mid", "up_blocks": "up", "double_blocks": "dbl", "single_blocks": "sgl",
                 "joint_blocks": "joint", "transformer_blocks": "tb", "single_transformer_blocks": "stb",
                 "blocks": "blk", "layers": "layer", "double_stream_blocks": "dbl", "single_stream_blocks": "sgl",
                 "noise_refiner": "noise", "context_refiner": "ctx"}


def block_label(block: str) -> str:
    """A short axis label: ``in 4``, ``mid``, ``out 5``, ``dbl 3``, ``sgl 12``, ``clip_l 5``."""
    head, _, rest = block.partition(".")
    num = rest.rpartition(".")[2]
    name = _BLOCK_LABELS.get(head, head)
    return f"{name} {num}" if num.isdigit() else name


def layer_name(key: str) -> str:
    """The layer's key inside its block (``1.transformer_blocks.0.attn2.to_k`` in ``input_blocks.4``)."""
    k = short_key(key)
    m = _KOHYA_TE.match(k)
    if m:
        return m.group(3)
    block = block_of(key)
    if k.startswith(block + "."):
        return k[len(block) + 1:]
    tail = "." + ".".join(block.split(".")[-2:]) + "."
    return k.split(tail, 1)[1] if block.count(".") == 2 and tail in k else k


def ordered(rows: Iterable[Mapping]) -> list[Mapping]:
    """Rows in model order: blocks in order, then layer family, then key."""
    return sorted(rows, key=lambda r: (block_sort_key(block_of(r["key"])), family_sort_key(family_of(r["key"])),
                                       short_key(r["key"])))


def is_transferred(row: Mapping) -> bool:
    """Transferred (a transfer) or passing the threshold (a similarity report)."""
    return row.get("decision") in (TRANSFERRED, PASSES)


def is_skipped(row: Mapping) -> bool:
    """Left out, for low similarity or any other reason (shape, missing, text encoder…)."""
    d = row.get("decision")
    return d is not None and d not in (TRANSFERRED, PASSES)


def report_kind(rows: Sequence[Mapping]) -> str:
    """``"similarity"`` (decisions are pass / below threshold), ``"transfer"``, or ``"compared"``
    (rows without decisions)."""
    decisions = {r.get("decision") for r in rows if r.get("decision") is not None}
    if not decisions:
        return "compared"
    if decisions <= {PASSES, LOW_SIMILARITY} and not any("energy_kept" in r for r in rows):
        return "similarity"
    return "transfer"


def phi_needed(row: Mapping, threshold: float | None) -> float | None:
    """The Φ (left) a layer needs for Φ̂ to reach the threshold: ``chance + threshold·(1 − chance)``."""
    chance = row.get("chance")
    if threshold is None or chance is None:
        return None
    return chance + threshold * (1.0 - chance)


def how_counts(rows: Iterable[Mapping]) -> dict[str, int]:
    """How the moved layers were moved (``copied``, ``transported``, ``projected (prolora)``…), most first."""
    counts: dict[str, int] = {}
    for r in rows:
        if is_transferred(r) and r.get("how"):
            counts[r["how"]] = counts.get(r["how"], 0) + 1
    return dict(sorted(counts.items(), key=lambda x: -x[1]))


def kept_phrase(rows: Iterable[Mapping]) -> str | None:
    """How much of the adapter's change the written deltas keep: "kept 100 % of its norm, cosine 1.00"
    (medians over the moved layers of equal shape), or None when no such layer was moved."""
    moved = [r for r in rows if is_transferred(r) and r.get("cos_kept") is not None]
    if not moved:
        return None
    cos = statistics.median(float(r["cos_kept"]) for r in moved)
    norm = statistics.median(float(r["energy_kept"]) for r in moved if r.get("energy_kept") is not None)
    return f"kept (median) {100 * norm:.0f} % of each delta's norm, cosine {cos:.2f}"


def summary_line(rows: list[Mapping], threshold: float | None = None) -> str:
    """E.g. "412 of 700 layers transferred (400 copied, 12 transported), kept (median) 100 % of each
    delta's norm, cosine 0.99, median Φ 0.93, lowest: output_blocks.5 attn2.to_k 0.41"."""
    scored = [r for r in rows if r.get("phi") is not None]
    parts = []
    kind = report_kind(rows)
    done = sum(1 for r in rows if is_transferred(r))
    if kind == "similarity":
        parts.append(f"{done} of {len(rows)} layers pass the threshold")
    elif kind == "transfer":
        hows = how_counts(rows)
        how = " (" + ", ".join(f"{n} {h}" for h, n in hows.items()) + ")" if hows else ""
        parts.append(f"{done} of {len(rows)} layers transferred{how}")
        kept = kept_phrase(rows)
        if kept:
            parts.append(kept)
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
                notes: Iterable[str] = (), verdict: str | None = None) -> str:
    """A fixed-width table, blocks in model order, with the verdict (when given: does the adapter
    fit the target at all) and the summary first."""
    lines = [title] + ([verdict] if verdict else []) + [summary_line(rows, threshold)]
    lines.extend(notes)
    lines.append("Φ: subspace similarity (1 = same); Φ̂ = (Φ − chance)/(1 − chance), 0 = no better than chance.")
    if any(r.get("how") for r in rows):
        lines.append("moved: ‖W_t − W_s‖/‖W_s‖ of the layer; kept: norm of the written delta over the adapter's; "
                     "cos: their cosine (1 = the adapter's own change).")
    lines.append("")
    wb = max([18] + [len(block_of(r["key"])) for r in rows])
    wf = max([16] + [len(family_of(r["key"])) for r in rows])
    header = (f"{'block':<{wb}} {'layer':<{wf}} {'Φ':>6} {'Φ̂ L':>6} {'Φ̂ R':>6} {'k':>4} {'moved':>6} {'kept':>5} "
              f"{'cos':>5}  decision")
    lines.append(header)
    lines.append("-" * len(header))
    for r in ordered(rows):
        phi = "" if r.get("phi") is None else f"{r['phi']:.3f}"
        hl = "" if r.get("phi_hat") is None else f"{r['phi_hat']:.3f}"
        hr = "" if r.get("phi_hat_right") is None else f"{r['phi_hat_right']:.3f}"
        k = r.get("rank", r.get("k"))
        kept = "" if r.get("energy_kept") is None else f"{100 * r['energy_kept']:.0f}%"
        cos = "" if r.get("cos_kept") is None else f"{r['cos_kept']:.2f}"
        moved = "" if r.get("weight_change") is None else f"{100 * r['weight_change']:.1f}%"
        decision = r.get("decision", "")
        if r.get("how") and is_transferred(r):
            decision = f"{decision}: {r['how']}"
        lines.append(f"{block_of(r['key']):<{wb}} {family_of(r['key']):<{wf}} {phi:>6} {hl:>6} {hr:>6} "
                     f"{'' if k is None else k:>4} {moved:>6} {kept:>5} {cos:>5}  {decision}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The per-block view: aggregation and the compact UI payload.
# ----------------------------------------------------------------------------------------------

#: Upper bound on the JSON size of a node's whole ``ui`` dict (text + view payload). ComfyUI
#: sends it over the websocket to every browser tab and keeps it in the prompt history.
UI_MAX_BYTES = 200_000
#: What :func:`ui_payload` aims for, leaving room for ComfyUI's message envelope.
UI_BUDGET_BYTES = 190_000
PAYLOAD_VERSION = 1
FAMILY_FIELDS = ("family", "phi_min", "phi_median", "n", "n_transferred", "n_skipped", "phi_needed", "n_copied",
                 "cos_median")
LAYER_FIELDS = ("name", "family", "phi", "phi_right", "phi_hat", "phi_hat_right", "decision", "k", "kept", "how",
                "cos", "moved")
_TEXT_CAP = 60_000


def _r3(x) -> float | None:
    return None if x is None else round(float(x), 3)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def block_stats(rows: Sequence[Mapping], threshold: float | None = None) -> list[dict]:
    """Per-block aggregation, blocks in model order: ``{"block", "label", "n", "n_transferred",
    "n_skipped", "phi_min", "phi_median", "families": [{"family", "phi_min", "phi_median", "n",
    "n_transferred", "n_skipped", "phi_needed", "rows"}]}`` (full precision; rows in order).

    ``phi_needed`` is the largest Φ (left side) any layer of the family needs to pass the
    threshold (:func:`phi_needed`); ``None`` without a threshold or chance level. ``n_copied``
    counts layers moved as they are (no SVD, so no Φ), ``cos_median`` is the median cosine of the
    written deltas against the adapter's own (None where nothing of equal shape was moved).
    """
    blocks: dict[str, dict[str, list[Mapping]]] = {}
    for r in ordered(rows):
        blocks.setdefault(block_of(r["key"]), {}).setdefault(family_of(r["key"]), []).append(r)
    out = []
    for block, fams in blocks.items():
        fam_out = []
        for fam in sorted(fams, key=family_sort_key):
            rs = fams[fam]
            phis = [float(r["phi"]) for r in rs if r.get("phi") is not None]
            needs = [n for n in (phi_needed(r, threshold) for r in rs) if n is not None]
            coss = [float(r["cos_kept"]) for r in rs if is_transferred(r) and r.get("cos_kept") is not None]
            fam_out.append({"family": fam, "phi_min": min(phis) if phis else None, "phi_median": _median(phis),
                            "n": len(rs), "n_transferred": sum(1 for r in rs if is_transferred(r)),
                            "n_skipped": sum(1 for r in rs if is_skipped(r)),
                            "phi_needed": max(needs) if needs else None,
                            "n_copied": sum(1 for r in rs if is_transferred(r) and r.get("how") == "copied"),
                            "cos_median": _median(coss), "rows": rs})
        all_rows = [r for f in fam_out for r in f["rows"]]
        phis = [float(r["phi"]) for r in all_rows if r.get("phi") is not None]
        out.append({"block": block, "label": block_label(block), "n": len(all_rows),
                    "n_transferred": sum(f["n_transferred"] for f in fam_out),
                    "n_skipped": sum(f["n_skipped"] for f in fam_out),
                    "phi_min": min(phis) if phis else None, "phi_median": _median(phis), "families": fam_out})
    return out


def report_payload(rows: Sequence[Mapping], *, threshold: float | None = None, title: str = "",
                   verdict: str | None = None) -> dict:
    """The compact per-block view of a report (JSON-ready; what ``web/lorax.js`` draws).

    ``{"version": 1, "kind": "similarity"|"transfer"|"compared", "title", "verdict", "summary", "threshold",
    "n", "n_transferred", "n_skipped", "family_fields": [...], "layer_fields": [...],
    "decisions": [distinct decision strings], "blocks": [{"name", "label", "n", "n_transferred",
    "n_skipped", "phi_min", "phi_median", "families": [[family, phi_min, phi_median, n,
    n_transferred, n_skipped, phi_needed, n_copied, cos_median], ...], "layers": [[name, family index,
    phi, phi_right, phi_hat, phi_hat_right, decision index, k, kept, how, cos, moved], ...]}],
    "layers_omitted": 0}``.

    Blocks in model order, families in :func:`family_sort_key` order, layers grouped by family;
    Φ values rounded to 3 decimals (what the view prints). ``n_transferred`` counts layers
    transferred (a transfer) or passing the threshold (a similarity report); ``decision`` indexes
    ``decisions`` (``null``: no decision).
    """
    decisions: list[str] = []
    index: dict[str, int] = {}

    def code(d):
        if d is None:
            return None
        if d not in index:
            index[d] = len(decisions)
            decisions.append(d)
        return index[d]

    blocks = []
    for b in block_stats(rows, threshold):
        fams, layers = [], []
        for i, f in enumerate(b["families"]):
            fams.append([f["family"], _r3(f["phi_min"]), _r3(f["phi_median"]), f["n"], f["n_transferred"],
                         f["n_skipped"], _r3(f["phi_needed"]), f["n_copied"], _r3(f["cos_median"])])
            for r in f["rows"]:
                kept = r.get("energy_kept")
                layers.append([layer_name(r["key"]), i, _r3(r.get("phi")), _r3(r.get("phi_right")),
                               _r3(r.get("phi_hat")), _r3(r.get("phi_hat_right")), code(r.get("decision")),
                               r.get("rank", r.get("k")), _r3(kept), r.get("how"), _r3(r.get("cos_kept")),
                               _r3(r.get("weight_change"))])
        blocks.append({"name": b["block"], "label": b["label"], "n": b["n"], "n_transferred": b["n_transferred"],
                       "n_skipped": b["n_skipped"], "phi_min": _r3(b["phi_min"]),
                       "phi_median": _r3(b["phi_median"]), "families": fams, "layers": layers})
    return {"version": PAYLOAD_VERSION, "kind": report_kind(rows), "title": title, "verdict": verdict,
            "summary": summary_line(list(rows), threshold), "threshold": threshold, "n": len(rows),
            "n_transferred": sum(1 for r in rows if is_transferred(r)),
            "n_skipped": sum(1 for r in rows if is_skipped(r)),
            "family_fields": list(FAMILY_FIELDS), "layer_fields": list(LAYER_FIELDS), "decisions": decisions,
            "blocks": blocks, "layers_omitted": 0}


def json_size(obj) -> int:
    """Bytes of ``json.dumps(obj)`` as ComfyUI sends it (default separators, ASCII escapes)."""
    return len(json.dumps(obj))


def cap_text(text: str, limit: int) -> str:
    if json_size(text) <= limit:
        return text
    lines = text.split("\n")
    kept, size = [], 2
    for i, line in enumerate(lines):
        s = json_size(line)  # + the newline, escaped as two bytes
        if size + s + 80 > limit:
            kept.append(f"… {len(lines) - i} more lines: the node's report output has the whole table.")
            break
        kept.append(line)
        size += s
    return "\n".join(kept)


def ui_payload(rows: Sequence[Mapping], *, threshold: float | None, title: str, text: str,
               max_bytes: int = UI_BUDGET_BYTES, verdict: str | None = None) -> dict:
    """A node's ``"ui"`` dict: ``{"text": [text], "lorax_report": [report_payload(...)]}``, at most
    ``max_bytes`` as JSON whatever the number of layers.

    When too large: the text is cut to its first lines (the node's STRING output keeps it whole),
    then the per-layer details of the largest blocks are dropped (their ``layers`` become ``[]``
    and ``layers_omitted`` counts them; block and family aggregates stay), and as a last resort
    the blocks themselves (``blocks_omitted``).
    """
    payload = report_payload(rows, threshold=threshold, title=title, verdict=verdict)
    ui = {"text": [text], "lorax_report": [payload]}
    if json_size(ui) <= max_bytes:
        return ui
    ui["text"] = [cap_text(text, min(_TEXT_CAP, max_bytes // 3))]
    size = json_size(ui)
    if size > max_bytes:
        by_size = sorted(payload["blocks"], key=lambda b: json_size(b["layers"]), reverse=True)
        for b in by_size:
            if size <= max_bytes:
                break
            size -= json_size(b["layers"]) - 2
            payload["layers_omitted"] += len(b["layers"])
            b["layers"] = []
        size = json_size(ui)
    if size > max_bytes:
        ui["text"] = [cap_text(text, 4_000)]
        size = json_size(ui)
    if size > max_bytes:
        keep = []
        budget = max_bytes - json_size({**ui, "lorax_report": [{**payload, "blocks": []}]}) - 40
        for b in payload["blocks"]:
            s = json_size(b) + 2
            if s > budget:
                break
            keep.append(b)
            budget -= s
        payload["blocks_omitted"] = len(payload["blocks"]) - len(keep)
        payload["blocks"] = keep
    return ui
