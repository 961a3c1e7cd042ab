"""LoRA-X: training-free transfer of adapters between diffusion model checkpoints.

Pure library (torch + safetensors + numpy; no ComfyUI import). The math follows LoRA-X
(Farhadzadeh et al., ICLR 2025): decompose source and target weights (:mod:`lorax.svd`,
:mod:`lorax.engine`), score layer pairs by subspace similarity (:mod:`lorax.similarity`), and
project deltas into the target's subspaces (:mod:`lorax.projection`, :mod:`lorax.transfer`).
Adapters are read and written by :mod:`lorax.lorax_adapter` (LoRA-X files) and
:mod:`lorax.kohya_export` (standard LoRA files).
"""

from .delta import Delta
from .engine import SVDEngine
from .errors import LoraxError
from .lorax_adapter import LoraxAdapter, load_lorax, save_lorax
from .similarity import LayerSimilarity, layer_similarity
from .svd import SVDFactors, truncated_svd, truncated_svd_batch
from .transfer import Decision, TransferResult, TransferSettings, transfer_deltas

__version__ = "0.1.0"

__all__ = [
    "Decision", "Delta", "LayerSimilarity", "LoraxAdapter", "LoraxError", "SVDEngine", "SVDFactors",
    "TransferResult", "TransferSettings", "layer_similarity", "load_lorax", "save_lorax",
    "transfer_deltas", "truncated_svd", "truncated_svd_batch",
]
