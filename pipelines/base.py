"""The one contract every data backend honours, so the trainer never asks which one it got."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: `train.py --help` imports this module, and not torch
    from torch import Tensor


@runtime_checkable
class Loader(Protocol):
    """Yields (images, labels) batches ready for the model.

    images: float32, normalised with the dataset's mean/std, on the training device when the backend
    can put them there, channels-last when asked.
    labels: int64 class indices in [0, num_classes) (sorted-folder-name order for folder datasets).
    """

    name: str  # backend name for logs, e.g. "memory", "dali-cpu"
    reason: str  # why this backend was chosen (for the log)
    num_samples: int  # samples this process sees per epoch (its shard)
    num_classes: int
    in_channels: int
    skipped: list[tuple[str, str]]  # (path, why) of every file left out so far, found up front or while loading
    resolution: int  # side of the square training images (a small dataset's native side until set_resolution)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int:  # batches in a whole epoch, also when resuming mid-epoch
        ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch `epoch` (order and augmentation drawn from the seed and
        `epoch`), from batch `start_batch` on: exactly the batches an uninterrupted pass would yield
        from there. Only that one iteration starts mid-way."""
        ...

    # Progressive resizing: both take effect from the next iteration (an epoch's start), so the side and
    # the micro-batch are functions of the epoch alone. The synthetic backend refuses a change.
    def set_resolution(self, size: int) -> None: ...

    def set_batch_size(self, batch_size: int) -> None: ...

    def close(self) -> None:  # release workers / pipelines
        ...


@dataclass
class LoaderConfig:
    """Everything a backend needs to build the train and val loaders of one process."""

    backend: str = "auto"  # one of pipelines.BACKENDS
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | cifar100 | imagenet
    data_dir: str | None = None  # dataset root (ImageFolder root with train/ and val/ for imagenet)
    val_labels: str | None = None  # ground truth of a flat val/ (pipelines.imagenet_layout); None: found near data_dir
    train_beton: str | None = None  # FFCV files, when the backend is ffcv
    val_beton: str | None = None
    batch_size: int = 128  # per process, train and val
    device: str = "cpu"
    channels_last: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int | None = None  # None: pipelines.default_num_workers()
    drop_last: bool = True  # for the train loader; val never drops samples
    # ImageNet-style augmentation (docs/data.md)
    image_size: int = 224  # train crop (until set_resolution) and val crop
    val_size: int | None = None  # val crop when it differs from image_size (train 176, test 224)
    val_resize: int = 256  # shorter side before the val centre crop
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect range
    scale_aug: bool = True  # False: the recipe switch that turns scale augmentation off
    train_subset: int | None = None  # train on N samples (pipelines.sharding.subset_indices)
    strict_data: bool = False  # fail on the first corrupt file instead of skipping it
    validation: str = "header"  # folder datasets: "header" (fast) or "full" (decode every file) check
    cache_dir: str | None = None  # where validation verdicts are cached (default ~/.cache/dhm_fast)
    synthetic_shape: tuple[int, int, int] = (3, 224, 224)
    synthetic_classes: int = 1000
    synthetic_batches: int = 100


def dataset_folder(data_dir: str | Path) -> Path:
    """`--data-dir` as a path; NotADirectoryError when it names a file (every loader would otherwise report
    the files it expected inside it as missing)."""
    path = Path(data_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--data-dir {path} is a file, not a dataset folder")
    return path


def check_labels(labels, num_classes: int, name_of: Callable[[int], str]) -> None:
    """ValueError naming the first sample whose label is outside [0, num_classes): such a label would
    otherwise reach a CUDA kernel as a device-side assert. `name_of(i)` names sample i (file or index)."""
    import numpy as np  # here: `train.py --help` imports this module and need not pay for numpy

    values = np.asarray(labels)
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name_of(i)} has label {int(values[i])}, outside [0, {num_classes}) "
                         f"({len(bad)} such sample(s))")
