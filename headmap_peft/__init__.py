"""headmap-peft: HeadMap (ICLR 2025) knowledge-circuit fine-tuning as a Hugging Face PEFT method.

Importing this package registers the HEADMAP tuner with PEFT (idempotent).
"""

from ._registry import HEADMAP, register
from .architectures import ATTENTION_OUTPUT_MODULES, Architecture, resolve_architecture
from .config import HeadMapConfig
from .layer import HeadMapLayer, HeadMapLinear
from .locate import Circuit, locate_circuit, mask_heads, select_calibration_samples
from .model import HeadMapModel

register()

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_OUTPUT_MODULES",
    "HEADMAP",
    "Architecture",
    "Circuit",
    "HeadMapConfig",
    "HeadMapLayer",
    "HeadMapLinear",
    "HeadMapModel",
    "locate_circuit",
    "mask_heads",
    "resolve_architecture",
    "register",
    "select_calibration_samples",
]
