"""The locating pre-step: calibration samples, the layer-conditioned head search, the circuit and its ablation."""

from .ablation import AblationRow, ablation_table, evaluate_masked, format_ablation_table, random_heads
from .calibration import sample_losses, select_calibration_samples
from .circuit import Circuit
from .masking import add_head_mask, keep_mask, mask_heads
from .search import METHODS, locate_circuit

__all__ = [
    "METHODS",
    "AblationRow",
    "Circuit",
    "ablation_table",
    "add_head_mask",
    "evaluate_masked",
    "format_ablation_table",
    "keep_mask",
    "locate_circuit",
    "mask_heads",
    "random_heads",
    "sample_losses",
    "select_calibration_samples",
]
