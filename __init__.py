"""LoRA-X for ComfyUI: move LoRA adapters between checkpoints without data or retraining.

The math lives in the pure library ``lorax/`` (imported as the top-level package ``lorax`` so the
nodes, the command line and the tests share one copy); the nodes in ``nodes/`` are thin glue.
The pack folder is appended (not prepended) to ``sys.path``: ComfyUI's own ``nodes`` module must
keep winning the name ``nodes``.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
