"""train.py with a signal sent at a chosen step, for tests/test_preemption.py (run alone or by torchrun).

    python tests/preempt_worker.py STEP SIGNAL TARGET -- <train.py flags>

train.py's main(); as optimizer step STEP (0-based, counted over the whole run) begins, rank 0 sends
SIGNAL (e.g. SIGTERM) to TARGET: "self", or "parent" (the torchrun agent that started it). When the
checkpoint it stops with is being written, the process sends itself SIGNAL once more (a second signal
during the save). Exits with main()'s code.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dhm_fast import checkpoint  # noqa: E402
from dhm_fast.cli import main  # noqa: E402
from dhm_fast.sampling import BranchSampler  # noqa: E402


def arm(step: int, sig: signal.Signals, target: str) -> None:
    sent = []
    active = BranchSampler.active
    save_atomic = checkpoint.save_atomic

    def active_then_signal(self, epoch: int, at: int):
        if at == step and not sent and os.environ.get("RANK", "0") == "0":
            sent.append(at)
            os.kill(os.getppid() if target == "parent" else os.getpid(), sig)
        return active(self, epoch, at)

    def save_with_a_second_signal(obj, path):
        if sent and Path(path).name == checkpoint.LAST and len(sent) == 1:
            sent.append("again")
            os.kill(os.getpid(), sig)
        return save_atomic(obj, path)

    BranchSampler.active = active_then_signal
    checkpoint.save_atomic = save_with_a_second_signal


if __name__ == "__main__":
    assert sys.argv[4] == "--", sys.argv
    torch.set_num_threads(1)  # two processes share two cores
    arm(int(sys.argv[1]), signal.Signals[sys.argv[2]], sys.argv[3])
    sys.exit(main(sys.argv[5:]))
