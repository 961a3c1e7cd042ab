"""ComfyUI glue for LoRA-X: thin V3 nodes (``io.ComfyNode``, see api.py) over the pure ``lorax`` library.

``NODE_CLASSES`` is the one list of the pack's nodes: the pack's ``comfy_entrypoint`` hands it to
ComfyUI, and the help pages (``web/docs/<node id>.md``), the tests and the README table are
checked against it. A new node is a ``io.ComfyNode`` subclass added here.
"""

from .api import API_VERSION, ComfyExtension
from .convert_node import LoraxConvert
from .experts_node import LoraxTransferTwoExperts
from .load_node import LoraxLoad
from .save_node import LoraxSave
from .scan_node import LoraxLibraryScan
from .similarity_node import LoraxSimilarityReport
from .train_node import LoraxTrain
from .transfer_node import LoraxTransfer

NODE_CLASSES = [
    LoraxLoad,
    LoraxSimilarityReport,
    LoraxTransfer,
    LoraxTransferTwoExperts,
    LoraxSave,
    LoraxConvert,
    LoraxTrain,
    LoraxLibraryScan,
]


class LoraxExtension(ComfyExtension):
    """What ComfyUI's loader asks a V3 pack for: its node classes."""

    async def get_node_list(self):
        return list(NODE_CLASSES)


__all__ = ["API_VERSION", "LoraxExtension", "NODE_CLASSES"]
