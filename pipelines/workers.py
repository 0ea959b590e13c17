"""How many loader workers (processes or threads) a process gets when the user does not say."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's or a scheduler's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """The cores available to this process over the processes of its node (LOCAL_WORLD_SIZE), less one
    for the training loop; at least 1 (docs/data.md, "Workers")."""
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, available_cores() // local_processes - 1)


def resolve_num_workers(num_workers: int | None) -> int:
    """`num_workers`, or the default when None; ValueError when negative."""
    if num_workers is None:
        return default_num_workers()
    if num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
    return num_workers
