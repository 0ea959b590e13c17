"""Which samples one process reads in one epoch: the same rule for every folder backend.

Train: a permutation drawn from (seed, epoch), cut into `world_size` equal shards (the last
n % world_size samples of that permutation wait for another epoch, so every process runs the same
number of steps). Val: sample i goes to process i % world_size, in order, so across processes every
sample is seen exactly once and nothing is padded or duplicated (shards may differ by one sample).
The permutation is the in-memory loader's, so every backend visits samples in the same order.
"""

from __future__ import annotations

import numpy as np
import torch


def check_shard(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")


def epoch_indices(n: int, *, rank: int, world_size: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Indices (int64) into a dataset of `n` samples that process `rank` reads in `epoch`."""
    check_shard(rank, world_size)
    if not shuffle:
        return np.arange(rank, n, world_size, dtype=np.int64)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).numpy()
    per_rank = n // world_size
    return order[: per_rank * world_size].reshape(per_rank, world_size)[:, rank].astype(np.int64)


def shard_size(n: int, *, rank: int, world_size: int, shuffle: bool) -> int:
    """len(epoch_indices(...)) without drawing the permutation."""
    check_shard(rank, world_size)
    return n // world_size if shuffle else len(range(rank, n, world_size))


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)
