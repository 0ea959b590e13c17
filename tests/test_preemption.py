"""Stopping on SIGTERM / SIGUSR1 / SIGINT: the current step finishes, every process stops at the same step
with one checkpoint, the run says where it stopped, exits with 128 + the signal's number, and the resumed
run ends bitwise where an uninterrupted one does.

The signal is sent from inside the run as a chosen step begins (tests/preempt_worker.py), so the step it
lands in is known; under torchrun it goes to the agent, which forwards it to both processes' groups.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import make_loaders
from small_data import write_fashion_mnist
from test_distributed import env, torchrun_cmd
from test_distributed import run as run_ok
from test_train import QUICK, assert_identical, read_log, without_timing

from dhm_fast import checkpoint
from dhm_fast.cli import main
from pipelines.sample_data import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "preempt_worker.py")


def stop_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("stopped by")]


def assert_resumed_run_is_identical(parts: Path, whole: Path) -> None:
    """The whole log.jsonl but its timings, and the final checkpoint: weights, optimizer, meter, RNG."""
    assert_identical(without_timing(read_log(whole)), without_timing(read_log(parts)), "log")
    a, b = checkpoint.load(whole / "last.pt"), checkpoint.load(parts / "last.pt")
    assert a.keys() == b.keys()
    for key in a.keys() - {"config", "provenance"}:  # configs differ in --out; provenance in the git commit
        assert_identical(without_timing(a[key]), without_timing(b[key]), key)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=256, n_test=32)


def common(data: Path, samples: int = 128) -> list[str]:  # samples / 16 steps an epoch, 2 epochs
    return QUICK + ["--train-subset", str(samples), "--batch-size", "16", "--deterministic", "--branch-prob", "0.6",
                    "--log-every-steps", "3", "--data-dir", str(data)]


@pytest.mark.slow
def test_sigterm_stops_after_the_step_with_one_checkpoint_and_the_resumed_run_is_identical(data, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(common(data) + ["--out", str(whole)]) == 0
    # SIGTERM during step 5 (mid-interval, mid-epoch), and again while the checkpoint is being written.
    result = subprocess.run([sys.executable, WORKER, "5", "SIGTERM", "self", "--", *common(data), "--out",
                             str(parts)], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert result.returncode == 143, result.stdout[-2000:] + result.stderr[-2000:]
    assert stop_lines(result.stdout) == [
        f"stopped by SIGTERM after step 6 (epoch 1, step 6 of 8); checkpoint {parts / 'last.pt'}; re-run the "
        "same command to resume (exit code 143)"], result.stdout[-2000:]
    assert "Traceback" not in result.stderr and "outputs:" not in result.stdout
    assert checkpoint.load(parts / "last.pt")["progress"]["step"] == 6
    assert not list(parts.glob(".*.tmp"))
    assert main(common(data) + ["--out", str(parts)]) == 0  # re-running the same command resumes
    assert_resumed_run_is_identical(parts, whole)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_ctrl_c_and_slurms_warning_signal_stop_the_same_way(data, tmp_path, capsys, monkeypatch, sig):
    import preempt_worker

    monkeypatch.setattr(preempt_worker.BranchSampler, "active", preempt_worker.BranchSampler.active)
    monkeypatch.setattr(checkpoint, "save_atomic", checkpoint.save_atomic)
    preempt_worker.arm(9, sig, "self")  # in epoch 2
    out, before = tmp_path / "run", signal.getsignal(sig)
    assert main(common(data) + ["--out", str(out)]) == 128 + sig
    assert stop_lines(capsys.readouterr().out)[0].startswith(f"stopped by {sig.name} after step 10 (epoch 2, step 2")
    assert checkpoint.load(out / "last.pt")["progress"]["step"] == 10
    assert signal.getsignal(sig) is before  # the handlers are put back after training


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_stops_both_processes_at_one_step_and_they_resume_identically(data, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = [*common(data, samples=256), "--log-every-steps", "2", "--dist-timeout", "30"]  # 16 steps an epoch
    run_ok(torchrun_cmd(str(ROOT / "train.py"), *args, "--out", str(whole)))
    # Rank 0 sends SIGTERM to torchrun's agent as step 1 begins; the agent signals both processes' groups,
    # which stop together at a log interval (every 2 steps), well before the epoch's end.
    stopped = subprocess.run(torchrun_cmd(WORKER, "1", "SIGTERM", "parent", "--", *args, "--out", str(parts)),
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    text = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and "closing signal SIGTERM" in text, text[-3000:]  # from the agent
    assert "forcefully exiting" not in text, text[-3000:]  # both exited by themselves, within the grace
    lines = stop_lines(stopped.stdout)
    step = checkpoint.load(parts / "last.pt")["progress"]["step"]
    assert len(lines) == 1 and f"after step {step} (epoch 1, step {step} of 16)" in lines[0], text[-3000:]
    assert lines[0].endswith("(exit code 143)") and 2 <= step < 16 and step % 2 == 0  # at a log interval
    resumed = subprocess.run(torchrun_cmd(str(ROOT / "train.py"), *args, "--out", str(parts)), cwd=ROOT,
                             env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"step {step}" in resumed.stdout, resumed.stderr[-3000:]
    assert_resumed_run_is_identical(parts, whole)


def test_loader_workers_outlive_the_stop_signal_of_their_group_and_obey_their_trainer(tmp_path):
    """torchrun signals a training process's whole group, SLURM every process: the torchvision loader's
    worker processes get the stop signal too. They must keep serving batches until the trainer shuts
    them down (dying would fail its next batch before it can checkpoint)."""
    ds = write_imagefolder(tmp_path / "d", num_classes=2, train_per_class=8, val_per_class=1, odd_files=False)
    train, _ = make_loaders("torchvision", ds.root, tmp_path / "cache", num_workers=2, batch_size=2)
    batches = iter(train)
    next(batches)
    workers = train._loader._iterator._workers
    pids = [str(w.pid) for w in workers]
    for sig in ("TERM", "USR1", "INT"):  # sent by another process, as by torchrun's agent or slurmstepd
        subprocess.run(["kill", f"-{sig}", *pids], check=True)
    assert len(list(batches)) == len(train) - 1  # every remaining batch, no "worker exited unexpectedly"
    assert all(w.is_alive() for w in workers)
    train.close()  # the trainer's own shutdown still ends them
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)
