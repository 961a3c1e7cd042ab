"""Test-only helper nodes, loaded into the real ComfyUI by tests/host.py through
``nodes.load_custom_node`` (never part of the pack).

* ``LoraxTestZeroConditioning`` -- a CONDITIONING of zeros ``[1, tokens, context_dim]``:
  the synthetic test model has no text encoder, so this replaces CLIPTextEncode.
* ``LoraxTestCapture`` -- an output node taking any value and returning it as its UI
  output ``{"value": [value]}``, so ``host.run_prompt(...)[node_id]["value"][0]`` is the
  value itself (in-process only; a real server would try to JSON-encode it).
"""

import torch


class _AnyType(str):
    """ComfyUI's usual wildcard: compares equal to every type name during validation."""

    def __ne__(self, other):
        return False


ANY = _AnyType("*")


class LoraxTestZeroConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "context_dim": ("INT", {"default": 768, "min": 1, "max": 8192}),
            "tokens": ("INT", {"default": 77, "min": 1, "max": 4096}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_lorax_test"

    def make(self, context_dim, tokens):
        return ([[torch.zeros(1, tokens, context_dim), {}]],)


class LoraxTestCapture:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (ANY,)}}

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "_lorax_test"

    def capture(self, value):
        return {"ui": {"value": [value]}}


NODE_CLASS_MAPPINGS = {
    "LoraxTestZeroConditioning": LoraxTestZeroConditioning,
    "LoraxTestCapture": LoraxTestCapture,
}
