"""Which backend `--loader auto` picks, and why (logged by the trainer; the rule is in docs/data.md)."""

from __future__ import annotations

import importlib.util

import torch

from pipelines.base import LoaderConfig
from pipelines.datasets import NATIVE_SIDES, SMALL_DATASETS  # noqa: F401 - NATIVE_SIDES: also this module's API


def module_available(name: str) -> bool:
    """Whether `name` can be imported, without importing it (FFCV's import alone takes seconds)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(config: LoaderConfig) -> tuple[str, str]:
    """The concrete backend for `config` and a one-line reason."""
    if config.backend != "auto":
        return config.backend, "asked for with --loader"
    if config.dataset in SMALL_DATASETS:
        return "memory", f"{config.dataset} fits in memory: whole dataset held as one uint8 tensor"
    notes = []
    if config.train_beton or config.val_beton:
        if not (config.train_beton and config.val_beton):
            raise ValueError("give both --train-beton and --val-beton, or neither")
        if module_available("ffcv"):
            return "ffcv", "FFCV .beton files given"
        notes.append(".beton files given but FFCV is not installed")
    if torch.device(config.device).type == "cuda" and torch.cuda.is_available():
        if module_available("nvidia.dali"):
            return "dali", "training on CUDA: DALI decodes JPEGs on the GPU"
        notes.append("DALI is not installed (GPU decoding unavailable)")
    else:
        notes.append("no CUDA device, so no GPU decoding")
    return "torchvision", "; ".join(notes) + ": torchvision ImageFolder with worker processes"
