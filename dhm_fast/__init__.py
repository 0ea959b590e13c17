"""dhm_fast: a fast trainer for Dynamic Hierarchical Mimicking (DHM), deep supervision and DKS."""

from dhm_fast.losses import dhm_loss
from dhm_fast.models import MODEL_NAMES, create_model

__version__ = "0.1.0"
__all__ = ["MODEL_NAMES", "create_model", "dhm_loss", "__version__"]
