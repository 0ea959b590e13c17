"""Stopping on a signal without losing work: SIGTERM (SLURM's preemption and time limit, torchrun's
shutdown, `kill`), SIGUSR1 (SLURM's `--signal` warning) and SIGINT (Ctrl-C).

The handler only notes the signal; the trainer reads the note between optimizer steps, at no cost, and
processes agree on it where they already synchronise (docs/distributed.md, "Preemption"). The run then
checkpoints and exits with 128 + the signal's number, as a process killed by that signal would report it.
Loader worker processes leave stopping to the trainer (pipelines/workers.py).
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """The first of SIGNALS received while installed (None: none yet); later ones change nothing, so a
    second Ctrl-C or SIGTERM cannot cut the checkpoint short (SIGKILL still ends the process at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _note(self, signum: int, _frame) -> None:
        if self.signum is None:
            self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        """The handlers for the duration of the block; the previous ones after it."""
        if threading.current_thread() is not threading.main_thread():  # Python handles signals there only
            yield self
            return
        previous = {sig: signal.signal(sig, self._note) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(sig: int | str) -> int:
    """128 + the signal's number (143 for SIGTERM), as for a process killed by it: non-zero, so torchrun
    restarts the group (while --max-restarts allows) and a scheduler's script can tell it from success
    (0), a failed peer (1) and bad input (2). docs/distributed.md, "Preemption", says why."""
    return 128 + int(signal.Signals[sig] if isinstance(sig, str) else sig)
