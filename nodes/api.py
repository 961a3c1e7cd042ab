"""The host's node API, pinned: every LoRA-X node is a V3 node (``io.ComfyNode``) of ``comfy_api`` 0.0.2.

ComfyUI keeps versioned copies of its node API (``comfy_api.v0_0_1``, ``v0_0_2``, ``latest``) so
that a custom node written against one version keeps loading when the host moves on. ``latest``
changes with every release; 0.0.2 is the newest version that both the CI host (ComfyUI 0.3.75)
and a current snapshot (0.33) offer, and both export ``io``, ``ui`` and ``ComfyExtension`` from
it. Importing from one place means a later move to another version is a one-line change here.

The custom link types the nodes pass between each other are declared here too, so every node
names them the same way.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: F401  (re-exported for the node modules)

API_VERSION = "0.0.2"
CATEGORY = "loaders/LoRA-X"

#: An adapter (LoRA-X or ordinary LoRA file, see handles.AdapterHandle), from LoRA-X Load.
Adapter = io.Custom("LORAX_ADAPTER")
#: A transferred adapter (handles.TransferHandle), from LoRA-X Transfer to LoRA-X Save.
Transfer = io.Custom("LORAX_TRANSFER")


def output(kind, name: str, tooltip: str, *, id: str | None = None):
    """An output shown (and saved in workflows) as ``name``, the V1 ``RETURN_NAMES`` entry.

    The V3 schema wants output ids distinct from input ids; where a node has an input of the same
    name (LoRA-X Load's ``model`` in, ``model`` out) the caller passes another ``id``. Saved
    workflows and the frontend only see ``name``.
    """
    return kind.Output(id or name, display_name=name, tooltip=tooltip)
