"""ComfyUI glue for LoRA-X: thin nodes over the pure ``lorax`` library (see bridge.py)."""

from .convert_node import LoraxConvert
from .load_node import LoraxLoad
from .save_node import LoraxSave
from .scan_node import LoraxLibraryScan
from .similarity_node import LoraxSimilarityReport
from .train_node import LoraxTrain
from .transfer_node import LoraxTransfer

NODE_CLASS_MAPPINGS = {
    "LoraxLoad": LoraxLoad,
    "LoraxSimilarityReport": LoraxSimilarityReport,
    "LoraxTransfer": LoraxTransfer,
    "LoraxSave": LoraxSave,
    "LoraxConvert": LoraxConvert,
    "LoraxTrain": LoraxTrain,
    "LoraxLibraryScan": LoraxLibraryScan,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraxLoad": "LoRA-X Load",
    "LoraxSimilarityReport": "Subspace Similarity Report",
    "LoraxTransfer": "LoRA-X Transfer",
    "LoraxSave": "LoRA-X Save",
    "LoraxConvert": "LoRA to LoRA-X",
    "LoraxTrain": "LoRA-X Train",
    "LoraxLibraryScan": "LoRA Library Scan",
}
