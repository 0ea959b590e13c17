"""Data loading backends behind one contract (`pipelines.base.Loader`).

The trainer calls `create_loaders(config)` and never imports DALI or FFCV itself.
"""

from __future__ import annotations

from pipelines.base import Loader, LoaderConfig

BACKENDS = ("auto", "torchvision", "dali", "ffcv", "memory", "synthetic")


def create_loaders(config: LoaderConfig) -> tuple[Loader, Loader]:
    """(train, val) loaders for this process, from the backend named in `config.backend`."""
    from pipelines.select import resolve_backend

    backend, reason = resolve_backend(config)
    config.backend = backend
    if backend == "memory":
        from pipelines.memory import create_memory_loaders as make
    elif backend == "synthetic":
        from pipelines.synthetic import create_synthetic_loaders as make
    elif backend == "torchvision":
        from pipelines.folder import create_folder_loaders as make
    elif backend == "dali":
        from pipelines.dali import create_dali_loaders as make
    elif backend == "ffcv":
        from pipelines.ffcv import create_ffcv_loaders as make
    else:
        raise ValueError(f"unknown loader {backend!r}; choose one of {', '.join(BACKENDS)}")
    train, val = make(config)
    train.reason = reason  # why this backend was chosen, for the log
    return train, val


__all__ = ["BACKENDS", "Loader", "LoaderConfig", "create_loaders"]
