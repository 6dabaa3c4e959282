"""mechanic-fast: the Mechanic learning-rate tuner for PyTorch, multi-tensor and sync-free.

from mechanic_fast import mechanize
opt = mechanize(torch.optim.AdamW)(model.parameters(), lr=1e-3)
"""

from ._api import is_mechanized, mechanic_log_values, mechanic_scale, mechanize
from ._config import INDUCTOR_OPTIONS, MechanicConfig
from .optimizer import Mechanic

__version__ = "0.1.0"
__all__ = [
    "INDUCTOR_OPTIONS",
    "Mechanic",
    "MechanicConfig",
    "is_mechanized",
    "mechanic_log_values",
    "mechanic_scale",
    "mechanize",
    "__version__",
]
