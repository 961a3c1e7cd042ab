"""The per-block report view: the compact UI payload (lorax/report.py) and the plot IMAGE
(nodes/plot.py). Pure functions, no ComfyUI.

The reference grouping here is written independently of lorax/report.py (plain regular
expressions over SDXL key names), so the aggregation is checked, not re-derived.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import statistics
import sys

import numpy as np
import pytest

import host
from lorax import report
from lorax.report import PASSES, LOW_SIMILARITY, UI_MAX_BYTES, json_size, summary_line, text_report, ui_payload


def _load_plot():
    name = "_lorax_test_plot"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, host.REPO_ROOT / "nodes" / "plot.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


plot = _load_plot()

# --------------------------------------------------------------------------------------------
# A synthetic SDXL-like similarity report: every layer a LoRA adapts in an SDXL UNet.
# --------------------------------------------------------------------------------------------

# (block, transformer depth) of SDXL's UNet, in model order.
SDXL_TRANSFORMERS = [("input_blocks.4", 2), ("input_blocks.5", 2), ("input_blocks.7", 10), ("input_blocks.8", 10),
                     ("middle_block", 10), ("output_blocks.0", 10), ("output_blocks.1", 10), ("output_blocks.2", 10),
                     ("output_blocks.3", 2), ("output_blocks.4", 2), ("output_blocks.5", 2)]
FAMILY_ORDER = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out", "ff.0", "ff.2", "proj_in", "proj_out"]


def sdxl_keys() -> list[str]:
    keys = []
    for block, depth in SDXL_TRANSFORMERS:
        t = f"{block}.1"
        keys.append(f"{t}.proj_in")
        for d in range(depth):
            for a in ("attn1", "attn2"):
                keys += [f"{t}.transformer_blocks.{d}.{a}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
            keys += [f"{t}.transformer_blocks.{d}.ff.net.0.proj", f"{t}.transformer_blocks.{d}.ff.net.2"]
        keys.append(f"{t}.proj_out")
    return ["diffusion_model." + k + ".weight" for k in keys]


def sdxl_rows(seed: int, threshold: float = 0.3) -> list[dict]:
    """Rows as the similarity node makes them: a fine-tune (Φ near 1) whose output blocks' cross-
    attention keys/values were retrained (Φ near chance), in a random order (the node sorts by Φ)."""
    r = random.Random(seed)
    rows = []
    for key in sdxl_keys():
        chance, chance_r = r.uniform(0.3, 0.6), r.uniform(0.3, 0.6)
        if "output_blocks" in key and re.search(r"attn2\.to_[kv]", key):
            phi = chance + r.uniform(0.0, 0.5) * (1 - chance)
        else:
            phi = 1.0 - abs(r.gauss(0, 0.03)) * (1 - chance)
        phi_r = min(1.0, max(chance_r, phi + r.gauss(0, 0.02)))
        hat, hat_r = (phi - chance) / (1 - chance), (phi_r - chance_r) / (1 - chance_r)
        rows.append({"key": key, "phi": phi, "phi_right": phi_r, "chance": chance, "chance_right": chance_r,
                     "phi_hat": hat, "phi_hat_right": hat_r, "k": 320, "shape_source": [640, 640],
                     "shape_target": [640, 640],
                     "decision": PASSES if min(hat, hat_r) >= threshold else LOW_SIMILARITY})
    r.shuffle(rows)
    return rows


def ref_block(key: str) -> str:
    return re.search(r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)", key).group(1)


def ref_family(key: str) -> str:
    m = re.search(r"\.(attn[12])\.(to_q|to_k|to_v|to_out)\.", key)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    m = re.search(r"\.ff\.net\.(\d)\.", key)
    if m:
        return f"ff.{m.group(1)}"
    return re.search(r"\.(proj_in|proj_out)\.", key).group(1)


def test_sdxl_payload_is_small_complete_and_aggregates_per_block(rng):
    threshold = 0.3
    rows = sdxl_rows(int(rng.integers(1 << 30)), threshold)
    assert len(rows) == 722  # 70 transformer blocks × 10 layers + 11 × proj_in/proj_out
    text = text_report(rows, title="Subspace similarity: SDXL → SDXL fine-tune, rank 320", threshold=threshold)
    ui = ui_payload(rows, threshold=threshold, title="t", text=text)
    size = json_size(ui)
    print(f"UI payload for {len(rows)} layers: {size} bytes (text {json_size(ui['text'])}, "
          f"view {json_size(ui['lorax_report'])})")
    assert size < UI_MAX_BYTES
    assert len(json.dumps(ui).encode()) == size  # ASCII on the wire: characters are bytes
    assert ui["text"] == [text]  # nothing had to be cut
    (p,) = ui["lorax_report"]
    p = json.loads(json.dumps(p))  # what the browser gets
    assert p["layers_omitted"] == 0 and "blocks_omitted" not in p
    assert p["summary"] == summary_line(rows, threshold) and p["kind"] == "similarity"
    assert p["n"] == 722 and p["n_transferred"] == sum(r["decision"] == PASSES for r in rows)
    assert p["n_skipped"] == 722 - p["n_transferred"] > 0
    assert [b["name"] for b in p["blocks"]] == [b for b, _ in SDXL_TRANSFORMERS]
    assert p["family_fields"] == ["family", "phi_min", "phi_median", "n", "n_transferred", "n_skipped", "phi_needed",
                                  "n_copied", "cos_median"]
    fields = p["layer_fields"]
    by_key = {r["key"]: r for r in rows}
    seen = 0
    for b in p["blocks"]:
        mine = [r for r in rows if ref_block(r["key"]) == b["name"]]
        assert b["n"] == len(mine)
        assert b["n_transferred"] == sum(r["decision"] == PASSES for r in mine)
        assert b["n_skipped"] == sum(r["decision"] == LOW_SIMILARITY for r in mine)
        assert b["phi_min"] == round(min(r["phi"] for r in mine), 3)
        assert b["phi_median"] == round(statistics.median(r["phi"] for r in mine), 3)
        assert [f[0] for f in b["families"]] == FAMILY_ORDER
        for fam, lo, med, n, done, skipped, need, copied, cos in b["families"]:
            assert copied == 0 and cos is None  # a similarity report moves nothing
            fr = [r for r in mine if ref_family(r["key"]) == fam]
            assert n == len(fr) and n > 0
            assert lo == round(min(r["phi"] for r in fr), 3)
            assert med == round(statistics.median(r["phi"] for r in fr), 3)
            assert done == sum(r["decision"] == PASSES for r in fr) and skipped == n - done
            assert need == round(max(r["chance"] + threshold * (1 - r["chance"]) for r in fr), 3)
        assert len(b["layers"]) == b["n"]
        fam_of_layer = [b["families"][layer[fields.index("family")]][0] for layer in b["layers"]]
        assert fam_of_layer == sorted(fam_of_layer, key=FAMILY_ORDER.index)  # layers grouped by family, in order
        for layer in b["layers"]:
            rec = dict(zip(fields, layer))
            key = f"diffusion_model.{b['name']}.{rec['name']}.weight"
            r = by_key[key]
            assert ref_family(key) == b["families"][rec["family"]][0]
            for f in ("phi", "phi_right", "phi_hat", "phi_hat_right"):
                assert rec[f] == round(r[f], 3), (key, f)
            assert p["decisions"][rec["decision"]] == r["decision"] and rec["k"] == 320 and rec["kept"] is None
            seen += 1
    assert seen == 722
    # The lowest layer the summary names is in a retrained output block's cross-attention.
    assert re.search(r"lowest: output_blocks\.\d attn2\.to_[kv] 0\.\d{3}", p["summary"]), p["summary"]


@pytest.mark.parametrize("copies", [7, 70])
def test_huge_reports_stay_under_the_budget_and_keep_every_block(copies):
    """5 000 and 50 000 layers: details are dropped (largest blocks first), aggregates stay."""
    base = sdxl_rows(1)
    rows = []
    for c in range(copies):  # more output blocks, same layer mix
        for r in base:
            rows.append({**r, "key": r["key"].replace("output_blocks.", f"output_blocks.{c + 1}")
                         if "output_blocks" in r["key"] else r["key"].replace("blocks.", f"blocks.{c}0", 1)
                         .replace("middle_block", f"input_blocks.{c}99")})
    text = text_report(rows, title="huge", threshold=0.3)
    ui = ui_payload(rows, threshold=0.3, title="huge", text=text)
    (p,) = ui["lorax_report"]
    assert json_size(ui) <= report.UI_BUDGET_BYTES < UI_MAX_BYTES
    assert p["layers_omitted"] > 0 and p["n"] == len(rows)
    assert ui["text"][0].startswith("huge\n" + summary_line(rows, 0.3))
    assert "more lines: the node's report output has the whole table" in ui["text"][0]
    n_blocks = len({report.block_of(r["key"]) for r in rows})
    kept = p["blocks"]
    assert len(kept) + p.get("blocks_omitted", 0) == n_blocks
    if copies == 7:
        assert len(kept) == n_blocks  # every block's aggregates are still there
        assert sum(b["n"] for b in kept) == len(rows)
        assert sum(len(b["layers"]) for b in kept) + p["layers_omitted"] == len(rows)


def test_summary_wording_follows_the_kind_of_report():
    sim = [{"key": "diffusion_model.input_blocks.1.1.proj_in.weight", "phi": 0.4, "chance": 0.5,
            "decision": LOW_SIMILARITY}]
    assert summary_line(sim).startswith("0 of 1 layers pass the threshold")  # not "transferred"
    tr = [dict(sim[0], energy_kept=None)]
    assert summary_line(tr).startswith("0 of 1 layers transferred")
    assert summary_line([dict(sim[0], decision="transferred")]).startswith("1 of 1 layers transferred")
    assert summary_line([{"key": "a.weight", "phi": 0.9}]).startswith("1 layers compared")


@pytest.mark.parametrize("key,block,family,label", [
    ("diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", "output_blocks.5", "attn2.to_k", "out 5"),
    ("diffusion_model.middle_block.1.transformer_blocks.3.ff.net.0.proj.weight", "middle_block", "ff.0", "mid"),
    ("diffusion_model.input_blocks.1.1.proj_in.weight", "input_blocks.1", "proj_in", "in 1"),
    ("diffusion_model.double_blocks.3.img_attn.qkv.weight", "double_blocks.3", "img_attn.qkv", "dbl 3"),
    ("diffusion_model.single_blocks.12.linear1.weight", "single_blocks.12", "linear1", "sgl 12"),
    ("clip_l.transformer.text_model.encoder.layers.3.mlp.fc1.weight", "clip_l.layers.3", "mlp.fc1", "clip_l 3"),
    ("lora_te_text_model_encoder_layers_11_self_attn_q_proj", "te.layers.11", "self_attn.q_proj", "te 11"),
])
def test_block_and_family_names(key, block, family, label):
    assert (report.block_of(key), report.family_of(key), report.block_label(report.block_of(key))) == \
        (block, family, label)


def test_blocks_come_in_model_order():
    blocks = ["output_blocks.10", "clip_l.layers.2", "middle_block", "input_blocks.11", "input_blocks.2",
              "single_blocks.0", "double_blocks.18", "time_embed", "output_blocks.2"]
    assert sorted(blocks, key=report.block_sort_key) == [
        "input_blocks.2", "input_blocks.11", "middle_block", "output_blocks.2", "output_blocks.10",
        "double_blocks.18", "single_blocks.0", "time_embed", "clip_l.layers.2"]


# --------------------------------------------------------------------------------------------
# The plot IMAGE: its pixels, not just its shape.
# --------------------------------------------------------------------------------------------

def _row(key, phi, decision, chance=0.5):
    hat = (phi - chance) / (1 - chance)
    return {"key": f"diffusion_model.{key}.weight", "phi": phi, "phi_right": phi, "chance": chance,
            "chance_right": chance, "phi_hat": hat, "phi_hat_right": hat, "decision": decision}


def _image(rows, threshold):
    img = plot.plot_rows(rows, threshold, "test")
    assert img.shape[0] == 1 and img.shape[-1] == 3 and float(img.min()) >= 0 and float(img.max()) <= 1
    return np.round(img[0].numpy() * 255).astype(np.uint8)


def _is(px, color) -> bool:
    return tuple(int(v) for v in px) == tuple(color)


def test_plot_pixels_full_bar_skip_mark_and_threshold_tick():
    threshold = 0.3  # Φ needed at chance 0.5: 0.5 + 0.3·0.5 = 0.65
    rows = [_row("input_blocks.1.1.transformer_blocks.0.attn1.to_q", 1.0, "transferred"),
            _row("input_blocks.1.1.transformer_blocks.0.attn1.to_k", 0.55, LOW_SIMILARITY),
            _row("output_blocks.3.1.transformer_blocks.0.attn2.to_v", 0.8, "transferred")]
    lay = plot.layout(rows, threshold)
    img = _image(rows, threshold)
    assert img.shape[:2] == (lay.height, lay.width)
    full, skipped, other = lay.bars
    assert (full.family, skipped.family, other.family) == ("attn1.to_q", "attn1.to_k", "attn2.to_v")
    assert full.x1 < skipped.x0 and skipped.x1 + plot.BLOCK_GAP <= other.x0  # model order, block gap
    green, red, white = plot.COLORS["transferred"], plot.COLORS["low"], plot.TICK
    tick_y = lay.y_of(0.65)
    assert lay.y0 < tick_y < lay.y1

    # Φ = 1: the bar fills its column from the 1.0 line to the 0 line, and nothing above.
    # Found without the layout: the only green columns just under the top line.
    cols = [x for x in range(lay.width) if _is(img[lay.y0 + 1, x], green)]
    assert cols == list(range(full.x0, full.x1 + 1)) and len(cols) >= 2
    for x in cols:
        column = img[lay.y0:lay.y1 + 1, x]
        assert all(_is(px, green) or (y + lay.y0 == tick_y and _is(px, white)) for y, px in enumerate(column))
        assert _is(img[tick_y, x], white)  # the threshold tick crosses it
        assert _is(img[lay.y0 - 2, x], plot.BACKGROUND)
        assert all(_is(img[y, x], plot.BACKGROUND)
                   for y in range(lay.y1 + plot.MARK_TOP, lay.y1 + plot.MARK_TOP + plot.MARK_H))  # not skipped

    # Φ = 0.55, skipped: red bar up to 0.55, background above it except the white tick at 0.65,
    # and the red mark under it.
    top = lay.y_of(0.55)
    for x in range(skipped.x0, skipped.x1 + 1):
        assert _is(img[top + 1, x], red) and _is(img[lay.y1 - 1, x], red)
        assert _is(img[top - 3, x], plot.BACKGROUND)
        assert _is(img[tick_y, x], white)
        assert all(_is(img[y, x], red) for y in range(lay.y1 + plot.MARK_TOP, lay.y1 + plot.MARK_TOP + plot.MARK_H))
    # Φ = 0.8 in another block: green to 0.8, its own tick, no mark.
    mid = (other.x0 + other.x1) // 2
    assert _is(img[lay.y_of(0.8) + 1, mid], green) and _is(img[lay.y_of(0.8) - 2, mid], plot.BACKGROUND)
    assert _is(img[tick_y, mid], white)
    assert _is(img[lay.y1 + plot.MARK_TOP + 2, mid], plot.BACKGROUND)


def test_plot_aggregates_a_family_median_and_marks_mixed_blocks():
    rows = [_row(f"output_blocks.0.1.transformer_blocks.{d}.attn2.to_k", phi, dec)
            for d, (phi, dec) in enumerate([(0.9, "transferred"), (0.6, LOW_SIMILARITY), (0.95, "transferred")])]
    lay = plot.layout(rows, 0.3)
    (bar,) = lay.bars
    assert (bar.n, bar.n_transferred, bar.n_skipped) == (3, 2, 1)
    assert bar.phi_median == pytest.approx(0.9) and bar.phi_min == pytest.approx(0.6)
    img = _image(rows, 0.3)
    mid = (bar.x0 + bar.x1) // 2
    assert _is(img[lay.y_of(0.9) + 1, mid], plot.COLORS["mixed"])  # some, not all, pass
    assert _is(img[lay.y_of(0.6), mid], plot.MIN_LINE)  # the lowest layer
    assert _is(img[lay.y1 + plot.MARK_TOP + 1, mid], plot.COLORS["low"])


def test_plot_of_720_layers_stays_readable():
    rows = sdxl_rows(3)
    lay = plot.layout(rows, 0.3)
    assert len(lay.bars) == 11 * 12 and len(lay.blocks) == 11
    assert lay.width <= plot.MAX_WIDTH and all(b.x1 - b.x0 + 1 >= 2 for b in lay.bars)
    img = _image(rows, 0.3)
    assert img.shape[:2] == (lay.height, lay.width)
    _image([], 0.3)  # an empty report still draws (axes only)
