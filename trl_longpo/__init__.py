"""trl-longpo: LongPO (short-to-long preference optimization, ICLR 2025) as a TRL plugin."""

from .config import LongPOConfig
from .evaluation import RetentionCallback
from .trainer import LongPOTrainer

__version__ = "0.1.0"
__all__ = ["LongPOConfig", "LongPOTrainer", "RetentionCallback", "__version__"]
