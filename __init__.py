"""LoRA-X for ComfyUI: move LoRA adapters between checkpoints without data or retraining.

The math lives in the pure library ``lorax/`` (imported as the top-level package ``lorax`` so the
nodes, the command line and the tests share one copy); the nodes in ``nodes/`` are thin glue.
The pack folder is appended (not prepended) to ``sys.path``: ComfyUI's own ``nodes`` module must
keep winning the name ``nodes``.

The nodes are registered the way ComfyUI registers its own (V3 node API): ``comfy_entrypoint``
returns a ``ComfyExtension`` listing them. There is deliberately no ``NODE_CLASS_MAPPINGS`` here:
ComfyUI's loader takes that older path whenever the name exists and never calls the entrypoint.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from .nodes import NODE_CLASSES, LoraxExtension  # noqa: E402

WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> LoraxExtension:
    """ComfyUI calls this once at start-up (``nodes.load_custom_node``)."""
    return LoraxExtension()


__all__ = ["NODE_CLASSES", "WEB_DIRECTORY", "comfy_entrypoint"]
