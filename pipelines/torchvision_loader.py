"""The portable ImageFolder loader: PIL decoding and torchvision transforms in DataLoader workers.

Train: the crop and flip of pipelines.augment, whose random numbers the sampler draws in the main
process and hands to the workers with each index (so worker count and resuming change nothing).
The training side is image_size, or what set_resolution sets (progressive resizing).
Val: resize the shorter side to val_resize, centre crop val_size (default image_size).
Workers are persistent (started once, reused every epoch), prefetch `PREFETCH` batches each, and
produce uint8 tensors, pinned when training on CUDA; normalisation and channels-last happen on the
training device, on whole batches. A file that fails to decode at run time (validation only reads
headers by default) is reported; in training it is replaced by the next decodable file of this process's
shard in the epoch's order (the same for any worker count), so that every process still runs the same number
of steps (under DDP a process one step short leaves the others waiting until --dist-timeout). In
validation it is dropped from its batch: every sample counts once.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from pipelines.augment import TrainCrop, batch_draws, flipped
from pipelines.base import LoaderConfig, check_labels
from pipelines.imagefolder import ImageList, scan_dataset
from pipelines.normalize import Normalizer
from pipelines.sharding import epoch_indices, num_batches, shard_size
from pipelines.workers import leave_stopping_to_the_trainer, resolve_num_workers

PREFETCH = 4  # batches in flight per worker

log = logging.getLogger(__name__)

Sample = tuple[Tensor | None, int, tuple[str, str] | None]
# (file index, augmentation draws, output side, (epoch, position in the shard)); val: (index, None, None, None)
Item = tuple[int, np.ndarray | None, int | None, tuple[int, int] | None]


class ImageListDataset(Dataset):
    """Decodes the validated files of one split; a decode failure is reported as (path, why) with the sample:
    (None, label, failure) in validation, a replacement's (image, label, failure) in training.

    Indexed by Item, as EpochSampler yields: the side travels with the index, so persistent workers follow a
    resolution schedule, and the position in the shard with it, so a replacement is found in any worker.
    """

    def __init__(self, images: ImageList, config: LoaderConfig) -> None:
        self.files = images.files
        self.labels = images.labels
        self.crop = TrainCrop.from_config(config)
        self.val_ops = T.Compose([T.Resize(config.val_resize, antialias=True),
                                  T.CenterCrop(config.val_size or config.image_size)])
        self.rank, self.world_size, self.seed = config.rank, config.world_size, config.seed
        self._shard: tuple[int, np.ndarray] | None = None  # (epoch, this process's training indices)

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, index: int) -> tuple[Tensor | None, str | None]:
        try:
            with Image.open(self.files[index]) as img:
                rgb = img.convert("RGB")  # grayscale, CMYK, palette PNGs -> 3 channels
        except (OSError, SyntaxError, ValueError) as e:
            return None, f"cannot decode at load time ({type(e).__name__}: {e})"
        return F.pil_to_tensor(rgb), None

    def _shard_order(self, epoch: int) -> np.ndarray:
        if self._shard is None or self._shard[0] != epoch:  # drawn once per epoch and worker, on a failure only
            self._shard = epoch, epoch_indices(len(self.files), rank=self.rank, world_size=self.world_size,
                                               shuffle=True, seed=self.seed, epoch=epoch)
        return self._shard[1]

    def _replacement(self, epoch: int, position: int) -> tuple[int, Tensor]:
        """The first decodable sample after `position` in this process's shard of `epoch`, wrapping round."""
        order = self._shard_order(epoch)
        for step in range(1, len(order)):
            index = int(order[(position + step) % len(order)])
            image, _ = self._decode(index)
            if image is not None:
                return index, image
        raise ValueError(f"no file of this process's training shard ({len(order)} files) decodes")

    def __getitem__(self, item: Item) -> Sample:
        index, draws, size, where = item
        image, why = self._decode(index)
        failure = None if image is not None else (self.files[index], why)
        if image is None and where is None:
            return None, self.labels[index], failure
        if image is None:
            index, image = self._replacement(*where)
        if draws is None:
            return self.val_ops(image), self.labels[index], failure
        top, left, h, w = self.crop.box(draws, image.shape[1], image.shape[2])
        image = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        if flipped(draws):
            image = F.horizontal_flip(image)
        return image, self.labels[index], failure


def collate(samples: list[Sample]) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    """Stack the decoded samples (replacements included); list every failure for the report."""
    good = [(x, y) for x, y, _ in samples if x is not None]
    bad = [b for _, _, b in samples if b is not None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.int64), bad


class EpochSampler(Sampler[list[Item]]):
    """This process's shard of the dataset for the current epoch (see pipelines.sharding), batch by batch,
    each index with its augmentation draws, output side and place in the shard (train) or Nones (val). Read
    in the main process at each epoch's start, so batch size and side may change between epochs."""

    def __init__(self, n: int, *, rank: int, world_size: int, train: bool, seed: int, batch_size: int,
                 size: int, drop_last: bool) -> None:
        self.n, self.rank, self.world_size, self.train, self.seed = n, rank, world_size, train, seed
        self.batch_size, self.size, self.drop_last = batch_size, size, drop_last
        self.epoch = 0
        self.start_batch = 0  # where a resumed epoch starts

    def __len__(self) -> int:
        n = shard_size(self.n, rank=self.rank, world_size=self.world_size, shuffle=self.train)
        return max(0, num_batches(n, self.batch_size, self.drop_last) - self.start_batch)

    def __iter__(self) -> Iterator[list[Item]]:
        epoch, start, self.start_batch = self.epoch, self.start_batch, 0  # a resumed epoch starts mid-way once
        idx = epoch_indices(self.n, rank=self.rank, world_size=self.world_size, shuffle=self.train,
                            seed=self.seed, epoch=epoch)
        for b in range(start, num_batches(len(idx), self.batch_size, self.drop_last)):
            chunk = idx[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            if not self.train:
                yield [(i, None, None, None) for i in chunk]
                continue
            draws = batch_draws(self.seed, epoch, self.rank, b, self.batch_size)
            yield [(i, d, self.size, (epoch, b * self.batch_size + j))
                   for j, (i, d) in enumerate(zip(chunk, draws, strict=False))]


class TorchvisionLoader:
    """torchvision ImageFolder-style loader honouring the `pipelines.base.Loader` contract."""

    name = "torchvision"
    reason = ""  # set by create_loaders

    def __init__(self, images: ImageList, config: LoaderConfig, *, train: bool) -> None:
        self.images = images
        self.train = train
        self.device = torch.device(config.device)
        self.batch_size = config.batch_size
        self.drop_last = config.drop_last and train
        self.strict = config.strict_data
        self.classes = images.classes
        self.num_classes = len(images.classes)
        check_labels(images.labels, self.num_classes, lambda i: images.files[i])
        self.in_channels = 3
        self.skipped: list[tuple[str, str]] = list(images.skipped)  # up front + found while loading
        self.sampler = EpochSampler(len(images), rank=config.rank, world_size=config.world_size, train=train,
                                    seed=config.seed, batch_size=self.batch_size, size=config.image_size,
                                    drop_last=self.drop_last)
        self.num_samples = shard_size(len(images), rank=config.rank, world_size=config.world_size,
                                      shuffle=train)
        self.normalize = Normalizer(channels_last=config.channels_last)
        workers = resolve_num_workers(config.num_workers)
        self._loader = DataLoader(
            ImageListDataset(images, config),
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            # Only seeds the workers' own RNGs, which nothing uses (augmentation comes with the index);
            # a private generator leaves the trainer's global RNG untouched.
            generator=torch.Generator().manual_seed(0),
            persistent_workers=workers > 0,
            prefetch_factor=PREFETCH if workers > 0 else None,
            worker_init_fn=leave_stopping_to_the_trainer,  # a preempted trainer still gets its batches
        )

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    @property
    def resolution(self) -> int:
        return self.sampler.size

    def set_resolution(self, size: int) -> None:
        self.sampler.size = size

    def set_batch_size(self, batch_size: int) -> None:
        self.batch_size = self.sampler.batch_size = batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch = epoch
        self.sampler.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        non_blocking = self.device.type == "cuda"
        if self._loader.num_workers > 0 and self._loader._iterator is None:
            # Workers are forked now. Unreachable objects still awaiting the cycle collector would be
            # collected in a worker too, and some cannot be: a DALI pipeline's finaliser waits for its
            # threads, which a forked child does not have, and hangs the worker. Collect them here.
            gc.collect()
        for images, labels, bad in self._loader:
            if bad:
                self._report(bad)
            if len(labels) == 0:  # validation only: a training sample is replaced
                continue
            images = images.to(self.device, non_blocking=non_blocking)
            yield self.normalize(images), labels.to(self.device, non_blocking=non_blocking)

    def _report(self, bad: Sequence[tuple[str, str]]) -> None:
        for path, why in bad:
            if self.strict:
                raise ValueError(f"bad image {path}: {why} (--strict-data)")
            log.warning("skipped %s: %s", path, why)
            self.skipped.append((path, why))

    def close(self) -> None:
        """Stop the persistent workers (they also stop when the loader is collected)."""
        workers = self._loader._iterator
        self._loader._iterator = None
        if workers is not None:
            workers._shutdown_workers()


def create_torchvision_loaders(config: LoaderConfig) -> tuple[TorchvisionLoader, TorchvisionLoader]:
    train_list, val_list = scan_dataset(config)
    return TorchvisionLoader(train_list, config, train=True), TorchvisionLoader(val_list, config, train=False)
