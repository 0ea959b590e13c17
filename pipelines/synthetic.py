"""Random batches made on the training device, so a benchmark times the model and nothing else.

A small pool of batches (standard-normal images, uniform labels) is drawn once, on the device, from
(seed, rank); iteration then only hands out references to them: no host work, no copies per step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from pipelines.base import LoaderConfig
from pipelines.sharding import check_shard, epoch_seed

POOL_BATCHES = 4  # distinct batches, cycled (enough that nothing can cache one input)


class SyntheticLoader:
    name = "synthetic"
    reason = ""  # set by create_loaders

    def __init__(self, *, batch_size: int, num_batches: int, shape: tuple[int, int, int], num_classes: int,
                 device: str | torch.device = "cpu", channels_last: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if min(batch_size, num_batches, num_classes) < 1 or len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"synthetic loader needs a positive batch size, batch count and class count and a "
                             f"[C, H, W] shape, got {batch_size}, {num_batches}, {num_classes} and {shape}")
        check_shard(rank, world_size)
        self.device = torch.device(device)
        self.num_batches = num_batches
        self.num_samples = batch_size * num_batches
        self.num_classes = num_classes
        self.in_channels = shape[0]
        self.skipped: list[tuple[str, str]] = []
        g = torch.Generator(device=self.device).manual_seed(epoch_seed(seed, 0, rank))  # one pool for all epochs
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.pool: list[tuple[Tensor, Tensor]] = []
        for _ in range(min(POOL_BATCHES, num_batches)):
            images = torch.randn((batch_size, *shape), generator=g, device=self.device)
            labels = torch.randint(0, num_classes, (batch_size,), generator=g, device=self.device)
            self.pool.append((images.contiguous(memory_format=fmt), labels))
        self.start_batch = 0

    def __len__(self) -> int:  # batches in a whole epoch, also when resuming mid-epoch
        return self.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch  # the pool is fixed: epochs differ in nothing else

    @property
    def resolution(self) -> int:
        return self.pool[0][0].shape[-1] if self.pool else 0

    def set_resolution(self, size: int) -> None:
        if size != self.resolution:
            raise ValueError("the synthetic loader has a fixed image size: no progressive resizing")

    def set_batch_size(self, batch_size: int) -> None:
        if self.pool and batch_size != len(self.pool[0][1]):
            raise ValueError("the synthetic loader has a fixed batch size")

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, self.start_batch = self.start_batch, 0
        for i in range(start, self.num_batches):
            yield self.pool[i % len(self.pool)]

    def close(self) -> None:
        self.pool = []


def create_synthetic_loaders(config: LoaderConfig) -> tuple[SyntheticLoader, SyntheticLoader]:
    common = dict(shape=tuple(config.synthetic_shape), num_classes=config.synthetic_classes,
                  device=config.device, channels_last=config.channels_last, rank=config.rank,
                  world_size=config.world_size)
    train = SyntheticLoader(batch_size=config.batch_size, num_batches=config.synthetic_batches,
                            seed=config.seed, **common)
    val = SyntheticLoader(batch_size=config.batch_size,
                          num_batches=max(1, config.synthetic_batches // 10), seed=config.seed + 1, **common)
    return train, val
