"""Loader workers: how many (processes or threads) a process gets when the user does not say, and how
worker processes treat the signals that stop a run."""

from __future__ import annotations

import os
import signal
import threading


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


def leave_stopping_to_the_trainer(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a worker process ignores the signals that ask the trainer to stop.

    torchrun signals each training process's whole process group and SLURM every process of a job, so a
    worker gets the trainer's SIGTERM (or SIGUSR1, SIGINT) too; dying of it would fail the trainer's next
    batch ("DataLoader worker exited unexpectedly") before it can checkpoint (dhm_fast/preemption.py).
    SIGTERM from the trainer itself (the DataLoader's own shutdown) still ends the worker, as PyTorch's
    worker handler does; a worker also ends when its trainer dies.
    """
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    # Blocked in this thread and so in every thread it starts: only sigwaitinfo below receives SIGTERM.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    trainer = os.getppid()

    def obey_the_trainer_only() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer:
            pass
        os._exit(0)

    threading.Thread(target=obey_the_trainer_only, name="sigterm-from-trainer", daemon=True).start()
