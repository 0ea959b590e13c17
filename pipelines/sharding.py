"""Which samples one process reads in one epoch, and the seeds of its randomness: one rule for every
backend (docs/data.md, "Order, sharding, resuming" and "--train-subset N").

Train: a permutation drawn from (seed, epoch) cut into `world_size` equal shards (the last
n % world_size samples wait for another epoch, so every process runs the same number of steps).
Val: sample i goes to process i % world_size, so every sample is seen exactly once.
"""

from __future__ import annotations

import numpy as np
import torch

SUBSET_SEED = 20_240_601  # fixed on purpose: the subset must not change with --seed


def epoch_seed(seed: int, epoch: int, rank: int | None = None) -> int:
    """The seed of epoch `epoch`'s randomness: shared by all processes (the sample order) when `rank`
    is None, else private to process `rank`. Non-negative and below 2**63, as torch and numpy take it."""
    shared = seed * 100_003 + epoch
    return (shared if rank is None else shared * 1_000_003 + rank) & 0x7FFF_FFFF_FFFF_FFFF


def subset_indices(n: int, size: int | None) -> np.ndarray:
    """The sorted indices of the `size` samples that `--train-subset size` keeps of `n` (all when None)."""
    if size is None or size >= n:
        return np.arange(n, dtype=np.int64)
    if size < 1:
        raise ValueError(f"--train-subset must be positive, got {size}")
    keep = np.random.default_rng(SUBSET_SEED).permutation(n)[:size]
    return np.sort(keep).astype(np.int64)


def check_shard(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")


def epoch_indices(n: int, *, rank: int, world_size: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Indices (int64) into a dataset of `n` samples that process `rank` reads in `epoch`."""
    check_shard(rank, world_size)
    if not shuffle:
        return np.arange(rank, n, world_size, dtype=np.int64)
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
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
