// LoRA-X for ComfyUI: the report a LoRA-X node returns in its UI payload, shown inside the node.
//
// Subspace Similarity Report and LoRA-X Transfer send {"text": [report], "lorax_report": [payload]}
// (payload: lorax/report.py, report_payload). This draws the per-block view: one bar per layer family
// in each block (height = median Φ, dark line = lowest Φ, white tick = Φ needed to pass the threshold,
// green/orange/red = all/some/none of its layers transferred, red mark below = layers skipped), a
// transfer's one-line verdict (does the adapter fit the target at all), the summary line, and on
// hover or click a block's layers (Φ and Φ̂ left and right, k, decision: copied / transported /
// projected, and how much of the adapter's change the written delta keeps as a cosine). A family copied
// as is (it barely moved: no SVD, no Φ) is a full teal bar. The text report stays available, read-only, under "Text report". LoRA-X Save, LoRA to LoRA-X and LoRA-X Train only
// send text, shown the same read-only way.
//
// Plain ES module, no build step: ComfyUI serves this folder (WEB_DIRECTORY) as it is.
import { app } from "../../scripts/app.js";

const VIEW_NODES = new Set(["LoraxSimilarityReport", "LoraxTransfer"]);
const TEXT_NODES = new Set(["LoraxSimilarityReport", "LoraxTransfer", "LoraxSave", "LoraxConvert", "LoraxTrain",
  "LoraxLibraryScan", "LoraxTransferTwoExperts"]);
const WIDGET = "lorax_report";

const COLORS = {
  transferred: "rgb(64,178,96)", low: "rgb(214,72,72)", mixed: "rgb(232,150,40)", other: "rgb(140,140,140)",
  compared: "rgb(80,140,220)", copied: "rgb(70,170,200)", tick: "#ffffff", minLine: "rgb(20,20,24)", grid: "rgb(60,60,66)",
  background: "rgb(24,24,28)", text: "rgb(210,210,210)", highlight: "rgba(255,255,255,0.10)",
};
// Geometry in CSS pixels, the same scheme as nodes/plot.py (the IMAGE output).
const G = { left: 34, right: 8, top: 8, plot: 132, below: 42, blockGap: 6, barGap: 1, minSlot: 4 };

const CSS = `
.lorax-view { display: flex; flex-direction: column; gap: 4px; font: 12px/1.35 sans-serif;
  color: var(--input-text, #ddd); box-sizing: border-box; width: 100%; height: 100%; overflow: hidden; }
.lorax-summary { font-weight: 600; white-space: normal; }
.lorax-verdict { font-weight: 600; white-space: normal; padding-left: 6px; border-left: 4px solid ${COLORS.other}; }
.lorax-verdict[data-level="fits"] { border-left-color: ${COLORS.transferred}; }
.lorax-verdict[data-level="partly"] { border-left-color: ${COLORS.mixed}; }
.lorax-verdict[data-level="none"] { border-left-color: ${COLORS.low}; }
.lorax-strip { overflow-x: auto; overflow-y: hidden; background: ${COLORS.background}; border-radius: 4px; flex: none; }
.lorax-strip canvas { display: block; cursor: pointer; outline: none; }
.lorax-legend { font-size: 10.5px; opacity: 0.8; }
.lorax-legend i { display: inline-block; width: 9px; height: 9px; margin: 0 3px 0 8px; vertical-align: -1px; }
.lorax-detail { flex: 1 1 auto; min-height: 60px; display: flex; flex-direction: column; overflow: hidden;
  border: 1px solid var(--border-color, #444);
  border-radius: 4px; padding: 3px 5px; background: var(--comfy-input-bg, #222); }
.lorax-detail-head { font-weight: 600; margin-bottom: 2px; flex: none; }
.lorax-scroll { flex: 1 1 auto; overflow: auto; min-height: 0; }
.lorax-hint { opacity: 0.7; }
.lorax-layers { border-collapse: collapse; font: 11px/1.3 monospace; }
.lorax-layers th { text-align: left; font: 600 11px/1.3 sans-serif; position: sticky; top: 0;
  background: var(--comfy-input-bg, #222); }
.lorax-layers td, .lorax-layers th { padding: 0 10px 0 0; white-space: nowrap; }
.lorax-layers th.num { text-align: right; }
.lorax-layers td:last-child { font-family: sans-serif; }
.lorax-layers td.num { text-align: right; }
.lorax-layers tr.skipped td { color: ${COLORS.low}; }
.lorax-layers tr.hot td { background: rgba(255,255,255,0.08); }
.lorax-text > summary { cursor: pointer; opacity: 0.85; }
.lorax-view textarea { width: 100%; box-sizing: border-box; font: 11px/1.3 monospace; resize: vertical;
  background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd); border: 1px solid var(--border-color, #444); }
`;

function injectStyle() {
  if (document.getElementById("lorax-style")) return;
  const style = document.createElement("style");
  style.id = "lorax-style";
  style.textContent = CSS;
  document.head.append(style);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

const fmt = (x) => (x === null || x === undefined ? "" : Number(x).toFixed(3));

// A family all of whose moved layers were copied as they are (barely moved: no SVD, so no Φ).
const copiedOnly = (f) => f[2] === null && (f[7] ?? 0) > 0;

function barColor(f) {
  // f: [family, phi_min, phi_median, n, n_transferred, n_skipped, phi_needed, n_copied, cos_median]
  const [, , median, n, done, skipped, , copied] = f;
  if (copiedOnly(f)) return copied === n ? COLORS.copied : COLORS.mixed;
  if (median === null) return COLORS.other;
  if (done + skipped === 0) return COLORS.compared;
  if (done === n) return COLORS.transferred;
  if (done === 0) return COLORS.low;
  return COLORS.mixed;
}

function shortDecision(d) {
  if (d === "skipped: similarity below threshold") return "skipped: low Φ̂";
  if (d === "passes threshold") return "passes";
  return d ?? "";
}

class ReportView {
  constructor(node, withView) {
    injectStyle();
    this.node = node;
    this.withView = withView;
    this.payload = null;
    this.text = "";
    this.pinned = -1;
    this.hover = -1;
    this.hoverFamily = null;
    this.blocks = [];
    this.root = el("div", "lorax-view");
    if (withView) {
      // A transfer's one-line compatibility verdict (does the adapter fit the target at all?).
      this.verdict = el("div", "lorax-verdict");
      this.verdict.hidden = true;
      this.summary = el("div", "lorax-summary", "Run the graph to see the report.");
      this.strip = el("div", "lorax-strip");
      this.canvas = el("canvas");
      this.canvas.tabIndex = 0;
      this.canvas.setAttribute("role", "img");
      this.strip.append(this.canvas);
      this.legend = el("div", "lorax-legend");
      this.detail = el("div", "lorax-detail");
      this.textBox = el("details", "lorax-text");
      this.textBox.append(el("summary", null, "Text report"));
      this.root.append(this.verdict, this.summary, this.strip, this.legend, this.detail, this.textBox);
      this.bindEvents();
      new ResizeObserver(() => this.draw()).observe(this.strip);
    }
    this.textarea = el("textarea");
    this.textarea.readOnly = true;
    this.textarea.rows = withView ? 12 : 8;
    this.textarea.spellcheck = false;
    (withView ? this.textBox : this.root).append(this.textarea);
    // Keep wheel and key presses for the view's own scrolling instead of the graph canvas.
    for (const ev of ["wheel", "keydown"]) this.root.addEventListener(ev, (e) => e.stopPropagation());
  }

  minHeight() {
    if (!this.withView) return 140;
    return this.payload ? 470 : 90;
  }

  update(payload, text) {
    this.text = text || "";
    this.textarea.value = this.text;
    if (!this.withView) return;
    this.payload = payload || null;
    this.pinned = -1;
    this.hover = -1;
    this.verdict.textContent = (this.payload && this.payload.verdict) || "";
    this.verdict.hidden = !this.verdict.textContent;
    const v = this.verdict.textContent;
    this.verdict.dataset.level = v.startsWith("Verdict: fits —") ? "fits"
      : v.startsWith("Verdict: fits partly") ? "partly" : v ? "none" : "";
    if (!this.payload) {
      this.summary.textContent = this.text.split("\n")[1] || "No report.";
      this.legend.textContent = "";
      this.detail.replaceChildren();
      this.blocks = [];
      this.draw();
      return;
    }
    const p = this.payload;
    this.summary.textContent = p.summary;
    this.summary.title = p.title || "";
    const verb = p.kind === "transfer" ? "transferred" : "pass";
    this.legend.replaceChildren(
      ...this.legendItem(COLORS.transferred, `all ${verb}`), ...this.legendItem(COLORS.mixed, "some"),
      ...this.legendItem(COLORS.low, "none"), ...this.legendItem(COLORS.tick, "Φ needed to pass"),
      ...(p.blocks.some((b) => b.families.some(copiedOnly))
        ? this.legendItem(COLORS.copied, "copied as is (barely moved, no SVD)") : []),
      document.createTextNode(" · bar: median Φ of a layer family, dark line: its lowest · hover or click a block"),
    );
    this.showBlock(-1);
    this.draw();
  }

  legendItem(color, label) {
    const sw = el("i");
    sw.style.background = color;
    return [sw, document.createTextNode(label)];
  }

  layout(width) {
    const blocks = this.payload?.blocks ?? [];
    const nBars = blocks.reduce((s, b) => s + b.families.length, 0);
    const gaps = G.blockGap * Math.max(0, blocks.length - 1);
    const w = Math.max(width, G.left + G.right + gaps + G.minSlot * nBars);
    const slot = Math.max(1, (w - G.left - G.right - gaps) / Math.max(1, nBars));
    const gap = slot >= 3 ? G.barGap : 0;
    let x = G.left;
    const out = blocks.map((b) => {
      const span = { name: b.name, label: b.label, x0: Math.round(x), bars: [] };
      for (const f of b.families) {  // whole pixels: crisp bars; x1 is exclusive
        const x0 = Math.round(x);
        span.bars.push({ family: f[0], f, x0, x1: Math.max(x0 + 1, Math.round(x + slot) - gap) });
        x += slot;
      }
      span.x1 = Math.max(span.x0 + 1, Math.round(x) - gap);
      x += G.blockGap;
      return span;
    });
    return { width: w, blocks: out };
  }

  draw() {
    if (!this.withView) return;
    const c = this.canvas;
    const cssW = Math.max(200, this.strip.clientWidth || 560);
    const lay = this.layout(cssW);
    this.blocks = lay.blocks;
    const h = G.top + G.plot + G.below;
    // Geometry in CSS pixels of the canvas, for tests and tools: blocks, their bars, the 1.0 and 0 rows.
    c.loraxBlocks = lay.blocks.map((b) => ({
      name: b.name, x0: b.x0, x1: b.x1, y0: G.top, y1: G.top + G.plot,
      bars: b.bars.map((br) => ({ family: br.family, x0: br.x0, x1: br.x1 })),
    }));
    const dpr = window.devicePixelRatio || 1;
    c.style.width = `${lay.width}px`;
    c.style.height = `${h}px`;
    c.width = Math.round(lay.width * dpr);
    c.height = Math.round(h * dpr);
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = COLORS.background;
    ctx.fillRect(0, 0, lay.width, h);
    const y0 = G.top, y1 = G.top + G.plot;
    const yOf = (phi) => y1 - Math.min(1, Math.max(0, phi)) * (y1 - y0);
    ctx.font = "10px sans-serif";
    ctx.textBaseline = "middle";
    for (const v of [0, 0.25, 0.5, 0.75, 1]) {
      const y = Math.round(yOf(v)) + 0.5;
      ctx.strokeStyle = COLORS.grid;
      ctx.beginPath(); ctx.moveTo(G.left, y); ctx.lineTo(lay.width - G.right, y); ctx.stroke();
      ctx.fillStyle = COLORS.text;
      ctx.fillText(v.toFixed(2), 4, y);
    }
    if (!this.payload) return;
    const active = this.hover >= 0 ? this.hover : this.pinned;
    let lastLabelEnd = -1e9;
    this.blocks.forEach((b, i) => {
      if (i === active || i === this.pinned) {
        ctx.fillStyle = COLORS.highlight;
        ctx.fillRect(b.x0 - 2, y0 - 4, b.x1 - b.x0 + 4, y1 - y0 + 30);
      }
      for (const bar of b.bars) {
        const [, min, median, n, , skipped, need] = bar.f;
        const w = bar.x1 - bar.x0;
        ctx.fillStyle = barColor(bar.f);
        if (copiedOnly(bar.f)) ctx.fillRect(bar.x0, y0, w, y1 - y0);
        else if (median === null) ctx.fillRect(bar.x0, y1 - 3, w, 3);
        else ctx.fillRect(bar.x0, yOf(median), w, y1 - yOf(median));
        if (median !== null && n > 1 && min !== null && min < median - 0.004) {
          ctx.fillStyle = COLORS.minLine;
          ctx.fillRect(bar.x0, Math.round(yOf(min)), w, 1);
        }
        if (need !== null) {
          ctx.fillStyle = COLORS.tick;
          ctx.fillRect(bar.x0, Math.round(yOf(need)), w, 1);
        }
        if (skipped) {
          ctx.fillStyle = COLORS.low;
          ctx.fillRect(bar.x0, y1 + 4, w, 6);
        }
        if (i === active && bar.family === this.hoverFamily) {
          ctx.strokeStyle = COLORS.tick;
          ctx.strokeRect(bar.x0 - 0.5, y0 - 0.5, w + 1, y1 - y0 + 1);
        }
      }
      ctx.fillStyle = "rgb(150,150,150)";
      ctx.fillRect(b.x0, y1 + 13, b.x1 - b.x0, 1);
      const blk = this.payload.blocks[i];
      const count = `${blk.n_transferred}/${blk.n}`;
      const tw = Math.max(ctx.measureText(b.label).width, ctx.measureText(count).width);
      const left = Math.max(b.x0, (b.x0 + b.x1) / 2 - tw / 2);
      if (left > lastLabelEnd + 4) {
        ctx.fillStyle = COLORS.text;
        ctx.fillText(b.label, left, y1 + 21);
        ctx.fillStyle = blk.n_transferred === blk.n ? COLORS.transferred : COLORS.mixed;
        ctx.fillText(count, left, y1 + 33);
        lastLabelEnd = left + tw;
      }
    });
  }

  hit(e) {
    const r = this.canvas.getBoundingClientRect();
    const x = (e.clientX - r.left) * (this.canvas.offsetWidth / (r.width || 1));
    const i = this.blocks.findIndex((b) => x >= b.x0 - G.blockGap / 2 && x <= b.x1 + G.blockGap / 2);
    const bar = i >= 0 ? this.blocks[i].bars.find((br) => x >= br.x0 && x <= br.x1) : null;
    return { index: i, family: bar ? bar.family : null };
  }

  bindEvents() {
    const c = this.canvas;
    c.addEventListener("pointermove", (e) => {
      const h = this.hit(e);
      if (h.index === this.hover && h.family === this.hoverFamily) return;
      this.hover = h.index;
      this.hoverFamily = h.family;
      this.showBlock(h.index >= 0 ? h.index : this.pinned);
      this.draw();
    });
    c.addEventListener("pointerleave", () => {
      this.hover = -1;
      this.hoverFamily = null;
      this.showBlock(this.pinned);
      this.draw();
    });
    c.addEventListener("pointerdown", (e) => e.stopPropagation());  // don't start dragging the node
    c.addEventListener("click", (e) => {
      const h = this.hit(e);
      this.pinned = h.index === this.pinned ? -1 : h.index;
      this.hoverFamily = h.family;
      this.showBlock(this.pinned >= 0 ? this.pinned : h.index);
      this.draw();
    });
    c.addEventListener("keydown", (e) => {
      if (!this.blocks.length || (e.key !== "ArrowLeft" && e.key !== "ArrowRight")) return;
      const step = e.key === "ArrowLeft" ? -1 : 1;
      const from = this.pinned >= 0 ? this.pinned : (step > 0 ? -1 : this.blocks.length);
      this.pinned = Math.min(this.blocks.length - 1, Math.max(0, from + step));
      this.showBlock(this.pinned);
      this.draw();
      e.preventDefault();
    });
  }

  showBlock(i) {
    const d = this.detail;
    const p = this.payload;
    d.dataset.block = p && i >= 0 && i < p.blocks.length ? p.blocks[i].name : "";
    if (!p) { d.replaceChildren(); return; }
    if (i < 0 || i >= p.blocks.length) {
      const hint = el("div", "lorax-hint",
        `${p.blocks.length} blocks, ${p.n} layers. Hover over a block for its layers, click to keep it.`);
      d.replaceChildren(hint);
      if (p.layers_omitted) d.append(el("div", "lorax-hint", `Per-layer details of ${p.layers_omitted} layers ` +
        "were left out to keep the payload small; the node's report output has them all."));
      if (p.blocks_omitted) d.append(el("div", "lorax-hint", `${p.blocks_omitted} more blocks are only in the ` +
        "node's report output."));
      return;
    }
    const b = p.blocks[i];
    const verb = p.kind === "transfer" ? "transferred" : "pass";
    const head = el("div", "lorax-detail-head",
      `${b.name}: ${b.n} layers, ${b.n_transferred} ${verb}` +
      (b.phi_min === null ? "" : `; Φ lowest ${fmt(b.phi_min)}, median ${fmt(b.phi_median)}`));
    const table = el("table", "lorax-layers");
    const thead = el("thead");
    const tbody = el("tbody");
    table.append(thead, tbody);
    if (b.layers.length) {
      thead.append(this.row("th", ["layer", "Φ L", "Φ R", "Φ̂ L", "Φ̂ R", "k", "decision", "kept (cos)"]));
      for (const l of b.layers) {
        const [name, fi, phi, phiR, hat, hatR, code, k, , how, cos] = l;
        const decision = code === null ? null : p.decisions[code];
        const said = how && decision === "transferred" ? how : shortDecision(decision);
        const tr = this.row("td", [name, fmt(phi), fmt(phiR), fmt(hat), fmt(hatR), k ?? "", said,
          cos === null || cos === undefined ? "" : Number(cos).toFixed(2)]);
        tr.dataset.layer = name;
        tr.dataset.family = b.families[fi][0];
        tr.dataset.decision = decision ?? "";
        if (decision && decision !== "transferred" && decision !== "passes threshold") tr.classList.add("skipped");
        if (this.hoverFamily && tr.dataset.family === this.hoverFamily) tr.classList.add("hot");
        tbody.append(tr);
      }
    } else {
      thead.append(this.row("th", ["family", "layers", verb, "Φ lowest", "Φ median", "Φ needed"]));
      for (const f of b.families) {
        const tr = this.row("td", [f[0], f[3], f[4], fmt(f[1]), fmt(f[2]), fmt(f[6])]);
        tr.dataset.family = f[0];
        if (f[5]) tr.classList.add("skipped");
        tbody.append(tr);
      }
    }
    const scroll = el("div", "lorax-scroll");  // the head stays put while the table scrolls
    scroll.append(table);
    if (!b.layers.length && b.n) {
      scroll.append(el("div", "lorax-hint", "Per-layer details left out to keep the payload small; " +
        "the node's report output has them."));
    }
    d.replaceChildren(head, scroll);
    const hot = tbody.querySelector("tr.hot");  // the hovered bar's layers: scroll them into view
    if (hot) scroll.scrollTop = Math.max(0, hot.offsetTop - thead.offsetHeight);
  }

  row(cell, values) {
    const tr = el("tr");
    values.forEach((v, j) => {
      const c = el(cell, j >= 1 && j <= 5 ? "num" : null, String(v));
      tr.append(c);
    });
    return tr;
  }
}

// Gap kept to a neighbour when a node widens (graph units).
const NEIGHBOUR_GAP = 20;

/** The width `node` can take, keeping its left edge, without reaching a node to its right that
 * shares any of its rows once it is `height` tall (the title bar counted in both). */
function roomToTheRight(node, height) {
  const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const [x, y] = node.pos;
  const top = y - title, bottom = y + height;
  let room = Infinity;
  for (const other of node.graph?._nodes ?? node.graph?.nodes ?? []) {
    if (other === node) continue;
    const ox = other.pos[0], oy = other.pos[1] - title;
    const oh = (other.flags?.collapsed ? 0 : other.size[1]) + title;
    if (oy >= bottom || oy + oh <= top || ox < x + node.size[0]) continue;  // not beside it on the right
    room = Math.min(room, ox - x - NEIGHBOUR_GAP);
  }
  return room;
}

function ensureView(node) {
  if (node.loraxView) return node.loraxView;
  const view = new ReportView(node, VIEW_NODES.has(node.comfyClass ?? node.type));
  const widget = node.addDOMWidget(WIDGET, "lorax_report", view.root, {
    serialize: false,
    getValue: () => view.text,
    setValue: () => {},
    getMinHeight: () => view.minHeight(),
  });
  widget.serialize = false;
  node.loraxView = view;
  return view;
}

app.registerExtension({
  name: "lorax.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const view = ensureView(this);
      view.update(message?.lorax_report?.[0] ?? null, (message?.text || []).join("\n"));
      // The view reflows to the node's width. The node grows downward to the view's height, and
      // wider (up to what the view reads best at) only into free space: never over a neighbour.
      const wanted = this.computeSize?.() ?? this.size;
      const height = Math.max(this.size[1], wanted[1]);
      const width = Math.max(this.size[0], Math.min(view.withView ? 620 : 420, roomToTheRight(this, height)));
      this.setSize?.([width, height]);
      this.setDirtySize?.(true);
      app.graph?.setDirtyCanvas(true, true);
      requestAnimationFrame(() => view.draw());
    };
  },
});
