"""Which backend `--loader auto` picks, and why (logged by the trainer)."""

from __future__ import annotations

from pipelines.base import LoaderConfig

SMALL_DATASETS = ("fashion-mnist", "cifar10", "cifar100")


def resolve_backend(config: LoaderConfig) -> tuple[str, str]:
    """The concrete backend for `config` and a one-line reason."""
    if config.backend != "auto":
        return config.backend, "asked for with --loader"
    if config.dataset in SMALL_DATASETS:
        return "memory", f"{config.dataset} fits in memory: whole dataset held as one uint8 tensor"
    return "torchvision", "no faster backend available"
