"""The portable ImageFolder loader: torchvision transforms in DataLoader workers.

Augmentation (REFERENCE.md section 4):
  train, scale_aug=True:  RandomResizedCrop(image_size, scale, ratio) + horizontal flip
  train, scale_aug=False: resize the shorter side to val_resize, random image_size crop + flip
                          (the paper's "no scale augmentation" for shallow ResNets with DHM: the
                          object keeps the scale it has at validation, only its position varies)
  val:                    resize the shorter side to val_resize, centre crop image_size
Workers produce uint8 tensors; normalisation (ImageNet mean/std) and channels-last happen on the
training device, on whole batches. A file that fails to decode at run time (validation only reads
headers by default) is dropped from its batch and reported, never replaced by another sample.
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

from pipelines.base import LoaderConfig
from pipelines.imagefolder import ImageList, scan_imagefolder
from pipelines.normalize import Normalizer
from pipelines.sharding import epoch_indices, num_batches, shard_size

log = logging.getLogger(__name__)

Sample = tuple[Tensor | None, int, tuple[str, str] | None]


def build_transform(config: LoaderConfig, train: bool) -> T.Compose:
    """PIL image -> uint8 [3, H, W] tensor with the recipe's augmentation."""
    size = config.image_size
    if train and config.scale_aug:
        ops = [T.RandomResizedCrop(size, scale=config.scale, ratio=config.ratio, antialias=True),
               T.RandomHorizontalFlip()]
    elif train:
        ops = [T.Resize(config.val_resize, antialias=True), T.RandomCrop(size), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(config.val_resize, antialias=True), T.CenterCrop(size)]
    return T.Compose([T.PILToTensor(), *ops])


class ImageListDataset(Dataset):
    """Decodes the validated files of one split; a decode failure yields (None, label, (path, why))."""

    def __init__(self, images: ImageList, transform: T.Compose) -> None:
        self.files = images.files
        self.labels = images.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")  # grayscale, CMYK, palette PNGs -> 3 channels
        except (OSError, SyntaxError, ValueError) as e:
            return None, self.labels[index], (path, f"cannot decode at load time ({type(e).__name__}: {e})")
        return self.transform(rgb), self.labels[index], None


def collate(samples: list[Sample]) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    good = [(x, y) for x, y, _ in samples if x is not None]
    bad = [b for _, _, b in samples if b is not None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.int64), bad


class EpochSampler(Sampler[int]):
    """This process's shard of the dataset for the current epoch (see pipelines.sharding)."""

    def __init__(self, n: int, *, rank: int, world_size: int, shuffle: bool, seed: int) -> None:
        self.n, self.rank, self.world_size, self.shuffle, self.seed = n, rank, world_size, shuffle, seed
        self.epoch = 0
        self.skip = 0  # samples to skip at the start (resuming mid-epoch)

    def __len__(self) -> int:
        n = shard_size(self.n, rank=self.rank, world_size=self.world_size, shuffle=self.shuffle)
        return n - self.skip

    def __iter__(self) -> Iterator[int]:
        idx = epoch_indices(self.n, rank=self.rank, world_size=self.world_size, shuffle=self.shuffle,
                            seed=self.seed, epoch=self.epoch)
        return iter(idx[self.skip:].tolist())


class FolderLoader:
    """torchvision ImageFolder-style loader honouring the `pipelines.base.Loader` contract."""

    name = "torchvision"

    def __init__(self, images: ImageList, config: LoaderConfig, *, train: bool) -> None:
        self.images = images
        self.train = train
        self.device = torch.device(config.device)
        self.batch_size = config.batch_size if train else (config.val_batch_size or config.batch_size)
        self.drop_last = config.drop_last and train
        self.strict = config.strict_data
        self.seed = config.seed
        self.classes = images.classes
        self.num_classes = len(images.classes)
        self.in_channels = 3
        self.skipped: list[tuple[str, str]] = list(images.skipped)  # up front + found while loading
        self.sampler = EpochSampler(len(images), rank=config.rank, world_size=config.world_size,
                                    shuffle=train, seed=config.seed)
        self.num_samples = shard_size(len(images), rank=config.rank, world_size=config.world_size,
                                      shuffle=train)
        self.normalize = Normalizer(channels_last=config.channels_last)
        self._generator = torch.Generator()
        self._loader = DataLoader(
            ImageListDataset(images, build_transform(config, train)),
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=config.num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            drop_last=self.drop_last,
            generator=self._generator,  # reseeded per epoch: workers' augmentation is reproducible
            prefetch_factor=4 if config.num_workers > 0 else None,
        )

    def __len__(self) -> int:  # batches in a whole epoch, also when resuming mid-epoch
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch = epoch
        self.sampler.skip = start_batch * self.batch_size
        # Workers seed their RNG from this generator; with num_workers=0 the process RNG is used.
        self._generator.manual_seed((self.seed * 100_003 + epoch) * 1_000 + self.sampler.rank)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        non_blocking = self.device.type == "cuda"
        if self._loader.num_workers > 0:
            # Workers are forked now. Unreachable objects still awaiting the cycle collector would be
            # collected in a worker too, and some cannot be: a DALI pipeline's finaliser waits for its
            # threads, which a forked child does not have, and hangs the worker. Collect them here.
            gc.collect()
        try:
            for images, labels, bad in self._loader:
                if bad:
                    self._report(bad)
                if len(labels) == 0:
                    continue
                images = images.to(self.device, non_blocking=non_blocking)
                yield self.normalize(images), labels.to(self.device, non_blocking=non_blocking)
        finally:
            self.sampler.skip = 0  # a resumed epoch starts mid-way once only

    def _report(self, bad: Sequence[tuple[str, str]]) -> None:
        for path, why in bad:
            if self.strict:
                raise ValueError(f"bad image {path}: {why} (--strict-data)")
            log.warning("skipped %s: %s", path, why)
            self.skipped.append((path, why))

    def close(self) -> None:
        # Workers belong to live iterators and end with them; nothing persistent to release.
        pass


def create_folder_loaders(config: LoaderConfig) -> tuple[FolderLoader, FolderLoader]:
    train_list, val_list = scan_folder_dataset(config)
    train = FolderLoader(train_list, config, train=True)
    val = FolderLoader(val_list, config, train=False)
    for loader in (train, val):
        loader.set_epoch(0)
    return train, val


def scan_folder_dataset(config: LoaderConfig) -> tuple[ImageList, ImageList]:
    """The validated (train, val) lists; `config.train_subset` keeps a seeded random N of train
    (the first N files would hold only the first classes)."""
    train, val = scan_imagefolder(config.data_dir, strict=config.strict_data, mode=config.validation,
                                  cache_dir=config.cache_dir)
    if config.train_subset:
        keep = np.sort(np.random.default_rng(config.seed).permutation(len(train))[: config.train_subset])
        train = ImageList(train.root, train.classes, [train.files[i] for i in keep],
                          [train.labels[i] for i in keep], train.skipped)
    return train, val
