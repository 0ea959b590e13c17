"""Data loading backends behind one contract (`pipelines.base.Loader`).

The trainer calls `create_loaders(config)` and never imports DALI or FFCV itself.
"""

from __future__ import annotations

import importlib

from pipelines.base import Loader, LoaderConfig
from pipelines.workers import default_num_workers

# backend -> (module, factory); imported only when chosen (FFCV's import alone takes seconds).
_FACTORIES = {
    "torchvision": ("pipelines.torchvision_loader", "create_torchvision_loaders"),
    "dali": ("pipelines.dali", "create_dali_loaders"),
    "ffcv": ("pipelines.ffcv", "create_ffcv_loaders"),
    "memory": ("pipelines.memory", "create_memory_loaders"),
    "synthetic": ("pipelines.synthetic", "create_synthetic_loaders"),
}
BACKENDS = ("auto", *_FACTORIES)  # the --loader choices


def create_loaders(config: LoaderConfig) -> tuple[Loader, Loader]:
    """(train, val) loaders for this process, from the backend named in `config.backend`."""
    from pipelines.backend_choice import resolve_backend
    from pipelines.reid import REID_DATASETS, create_reid_loaders

    if config.dataset in REID_DATASETS:  # one backend: images decoded once, held on the device
        return create_reid_loaders(config)
    backend, reason = resolve_backend(config)
    if backend not in _FACTORIES:
        raise ValueError(f"unknown loader {backend!r}; choose one of {', '.join(BACKENDS)}")
    config.backend = backend
    module, factory = _FACTORIES[backend]
    train, val = getattr(importlib.import_module(module), factory)(config)
    train.reason = val.reason = reason
    return train, val


__all__ = ["BACKENDS", "Loader", "LoaderConfig", "create_loaders", "default_num_workers"]
