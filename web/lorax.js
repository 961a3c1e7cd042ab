// LoRA-X for ComfyUI: shows the text report a LoRA-X node returns in its UI payload inside the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = new Set(["LoraxSimilarityReport", "LoraxTransfer", "LoraxSave", "LoraxConvert"]);

app.registerExtension({
  name: "lorax.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text || []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "lorax_report");
      if (!widget) {
        widget = ComfyWidgets.STRING(this, "lorax_report", ["STRING", { multiline: true }], app).widget;
        widget.inputEl && (widget.inputEl.readOnly = true);
        widget.inputEl && (widget.inputEl.style.fontFamily = "monospace");
        widget.serialize = false;
      }
      widget.value = text;
      this.setDirtySize?.(true);
      app.graph?.setDirtyCanvas(true, true);
    };
  },
});
