"""dhm_fast: a fast trainer for Dynamic Hierarchical Mimicking (DHM), deep supervision and DKS."""

from dhm_fast.catalog import MODEL_NAMES

__version__ = "0.1.0"
__all__ = ["MODEL_NAMES", "create_model", "dhm_loss", "__version__"]

# Imported on first use: `import dhm_fast` (and with it `train.py --help`) does not import torch.
_LAZY = {"dhm_loss": "dhm_fast.losses", "create_model": "dhm_fast.models"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dhm_fast' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
