"""The one contract every data backend honours, so the trainer never asks which one it got."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Loader(Protocol):
    """Yields (images, labels) batches ready for the model.

    images: float32 (or the backend's float dtype), normalised with the dataset's mean/std, on the
    training device when the backend can put them there, channels-last when asked.
    labels: int64 class indices (sorted-folder-name order for folder datasets).
    """

    name: str  # backend name for logs, e.g. "memory", "dali-cpu"
    num_samples: int  # samples this process sees per epoch (its shard)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int:  # batches per epoch
        ...

    def set_epoch(self, epoch: int) -> None:  # new, seed-reproducible shuffle each epoch
        ...

    def close(self) -> None:  # release workers / pipelines
        ...


@dataclass
class LoaderConfig:
    """Everything a backend needs to build the train and val loaders of one process."""

    backend: str = "auto"  # auto | torchvision | dali | ffcv | memory | synthetic
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | cifar100 | imagenet
    data_dir: str | None = None  # dataset root (ImageFolder root with train/ and val/ for imagenet)
    train_beton: str | None = None  # FFCV files, when the backend is ffcv
    val_beton: str | None = None
    batch_size: int = 128  # per process
    val_batch_size: int | None = None  # defaults to batch_size
    device: str = "cpu"
    channels_last: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 2
    drop_last: bool = True  # for the train loader; val never drops samples
    # ImageNet-style augmentation (REFERENCE.md section 4)
    image_size: int = 224  # train crop and val crop
    val_resize: int = 256  # shorter side before the val centre crop
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect range
    scale_aug: bool = True  # False: the recipe switch that turns scale augmentation off
    # small datasets (in-memory path): pad-and-crop + flip
    crop_padding: int = 4
    train_subset: int | None = None  # first N training samples (quick runs, benchmarks)
    strict_data: bool = False  # fail on the first corrupt file instead of skipping it
    validation: str = "header"  # folder datasets: "header" (fast) or "full" (decode every file) check
    cache_dir: str | None = None  # where validation verdicts are cached (default ~/.cache/dhm_fast)
    synthetic_shape: tuple[int, int, int] = (3, 224, 224)
    synthetic_classes: int = 1000
    synthetic_batches: int = 100
