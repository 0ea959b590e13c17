"""Schedules: learning rate, the mimicking weight alpha and the temperature, as functions of progress.

Values are checked against hand-computed numbers; the end-to-end test checks that a run stopped in the
middle of the alpha warm-up and resumed sees, step for step, the alpha and temperature an
uninterrupted run sees, and ends with the same weights.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pipelines.memory
from dhm_fast import checkpoint, logbook
from dhm_fast.cli import main
from dhm_fast.losses import LossConfig
from dhm_fast.schedules import LRSchedule, Ramp, ramp_epochs
from pipelines.small_datasets import ArraySplit

FASHION = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------- learning rate
@pytest.mark.parametrize(
    "epoch, expected",
    [(0.0, 0.1), (3.99, 0.1), (4.0, 0.01), (5.5, 0.01), (6.0, 0.001), (7.999, 0.001), (50.0, 0.001)],
)
def test_multistep_lr_divides_by_gamma_at_each_milestone(epoch, expected):
    s = LRSchedule(0.1, "multistep", milestones=(4, 6), gamma=0.1, total_epochs=8)
    assert s.lr(epoch) == pytest.approx(expected, rel=1e-12)


def test_multistep_milestones_may_be_fractional_and_unsorted():
    s = LRSchedule(1.0, "multistep", milestones=(2.5, 1.5), gamma=0.5, total_epochs=4)
    assert [s.lr(e) for e in (1.49, 1.5, 2.49, 2.5)] == [1.0, 0.5, 0.5, 0.25]


@pytest.mark.parametrize(
    "epoch, expected",
    [(0.0, 0.2), (2.5, 0.1 + 0.1 * math.cos(math.pi / 4)), (5.0, 0.1), (10.0, 0.0), (12.0, 0.0)],
)
def test_cosine_lr_follows_half_a_cosine_to_zero(epoch, expected):
    s = LRSchedule(0.2, "cosine", total_epochs=10)
    assert s.lr(epoch) == pytest.approx(expected, abs=1e-12)


def test_cosine_lr_with_floor_and_warm_up():
    s = LRSchedule(1.0, "cosine", warmup_epochs=2, total_epochs=10, min_lr=0.1, warmup_start=0.01)
    assert s.lr(0) == pytest.approx(0.01)  # warm-up starts at warmup_start x the scheduled rate
    assert s.lr(1) == pytest.approx(0.01 + 0.99 * 0.5)  # linear in between
    assert s.lr(2) == pytest.approx(1.0)  # the cosine starts after the warm-up
    assert s.lr(6) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the remaining 8 epochs
    assert s.lr(10) == pytest.approx(0.1)


def test_warm_up_scales_the_multistep_rate():
    s = LRSchedule(0.1, "multistep", milestones=(4,), warmup_epochs=0.5, total_epochs=8)
    assert s.lr(0.25) == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))
    assert s.lr(0.5) == pytest.approx(0.1)


def test_constant_lr_and_unknown_kind():
    assert {LRSchedule(0.3, "constant").lr(e) for e in (0, 1.5, 99)} == {0.3}
    with pytest.raises(ValueError, match="unknown lr schedule 'step'; choose one of multistep"):
        LRSchedule(0.1, "step")


# ---------------------------------------------------------------------------- alpha / temperature ramps
@pytest.mark.parametrize(
    "epoch, expected", [(-1.0, 0.0), (0.0, 0.0), (1.0, 0.25), (2.0, 0.5), (3.0, 0.75), (4.0, 1.0), (9.0, 1.0)]
)
def test_linear_ramp_values(epoch, expected):
    assert Ramp(1.0, "linear", 4.0).at(epoch) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "epoch, expected",
    [(0.0, 0.0), (1.0, 2 * (1 - math.cos(math.pi / 4))), (2.0, 2.0),
     (3.0, 2 * (1 - math.cos(3 * math.pi / 4))), (4.0, 4.0), (5.0, 4.0)],
)
def test_cosine_ramp_values(epoch, expected):
    # value 4: 0.5 * (1 - cos(pi * t)) * 4
    assert Ramp(4.0, "cosine", 4.0).at(epoch) == pytest.approx(expected, abs=1e-12)


def test_ramp_from_a_start_value_and_downwards():
    assert Ramp(4.0, "linear", 2.0, start=1.0).at(1.0) == pytest.approx(2.5)
    t = Ramp(1.0, "cosine", 2.0, start=4.0)  # a temperature annealed from 4 down to 1
    assert t.at(0) == 4.0 and t.at(1.0) == pytest.approx(2.5) and t.at(2.0) == 1.0


def test_constant_or_zero_length_ramp_is_the_value_from_the_first_step():
    assert {Ramp(0.7, "constant", 5.0).at(e) for e in (0, 2.5, 10)} == {0.7}
    assert {Ramp(0.7, "linear", 0.0).at(e) for e in (0, 2.5, 10)} == {0.7}


def test_bad_ramps_are_refused():
    with pytest.raises(ValueError, match="unknown ramp shape 'exp'; choose one of constant, linear, cosine"):
        Ramp(1.0, "exp", 2.0)
    with pytest.raises(ValueError, match="ramp length must be >= 0 epochs, got -1"):
        Ramp(1.0, "linear", -1.0)


@given(
    shape=st.sampled_from(["linear", "cosine"]),
    value=st.floats(0.0, 10.0),
    start=st.floats(0.0, 10.0),
    epochs=st.floats(0.01, 100.0),
    a=st.floats(-1.0, 200.0),
    b=st.floats(-1.0, 200.0),
)
def test_ramps_are_monotone_between_start_and_value(shape, value, start, epochs, a, b):
    r = Ramp(value, shape, epochs, start=start)
    lo, hi = sorted((a, b))
    ra, rb = r.at(lo), r.at(hi)
    tol = 1e-9 * (1 + abs(value) + abs(start))
    assert min(start, value) - tol <= ra <= max(start, value) + tol
    assert (rb - ra) * (value - start) >= -tol  # moves only towards the value
    assert r.at(epochs) == value and r.at(epochs + 1) == value


@pytest.mark.parametrize(
    "spec, total, expected",
    [(0.5, 8, 4.0), (0.25, 30, 7.5), (0.99, 10, 9.9), (1.0, 8, 1.0), (3.0, 8, 3.0), (0.0, 8, 0.0),
     (12.0, 8, 12.0)],
)
def test_ramp_length_is_epochs_or_a_fraction_of_training(spec, total, expected):
    assert ramp_epochs(spec, total) == pytest.approx(expected)


# ---------------------------------------------------------------------------- resume mid-warm-up
STEPS_PER_EPOCH = 8  # 128 images, batch 16
RUN = [
    "--arch", "resnet20", "--method", "dhm", "--loader", "memory", "--train-subset", "128",
    "--batch-size", "16", "--epochs", "2", "--lr", "0.05", "--lr-schedule", "multistep",
    "--milestones", "1.5", "--warmup-epochs", "0.5",
    "--alpha", "0.8", "--alpha-ramp", "linear", "--alpha-ramp-epochs", "0.75",  # a fraction: 1.5 epochs
    "--temperature", "1", "--temperature-start", "4", "--temperature-ramp", "cosine",
    "--temperature-ramp-epochs", "1.25",  # in epochs
    "--amp", "none", "--no-channels-last", "--deterministic", "--seed", "3",
]


def expected_alpha(step: int) -> float:
    return 0.8 * min(step / STEPS_PER_EPOCH / 1.5, 1.0)


def expected_temperature(step: int) -> float:
    t = min(step / STEPS_PER_EPOCH / 1.25, 1.0)
    return 4.0 + (1.0 - 4.0) * 0.5 * (1 - math.cos(math.pi * t))


@pytest.fixture
def schedule_trace(monkeypatch):
    """Record the alpha and temperature of every loss call; evaluate on 64 test images only (the
    schedule is under test here, not the accuracy)."""
    trace: list[tuple[float, float]] = []
    real_loss = LossConfig.compute

    def recording_loss(self, *args, alpha, temperature, **kwargs):
        trace.append((alpha, temperature))
        return real_loss(self, *args, alpha=alpha, temperature=temperature, **kwargs)

    real_data = pipelines.memory.load_small_dataset

    def small_test_set(*args, **kwargs):
        data = real_data(*args, **kwargs)
        return dataclasses.replace(data, test=ArraySplit(data.test.images[:64], data.test.labels[:64]))

    monkeypatch.setattr(LossConfig, "compute", recording_loss)
    monkeypatch.setattr(pipelines.memory, "load_small_dataset", small_test_set)
    return trace


def run_cli(args: list[str], capsys) -> str:
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.mark.slow  # about 7 s of CPU each (three short runs)
@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
@pytest.mark.parametrize("stop_at", [5, 11])  # inside the first epoch / in the second, both inside the ramp
def test_resume_mid_warm_up_continues_the_schedule_exactly(tmp_path, capsys, schedule_trace, stop_at):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_cli(RUN + ["--out", str(whole)], capsys)
    uninterrupted = list(schedule_trace)
    schedule_trace.clear()
    run_cli(RUN + ["--out", str(parts), "--max-steps", str(stop_at)], capsys)
    before = list(schedule_trace)
    assert len(before) == stop_at and before[-1][0] < 0.8  # stopped while alpha was still ramping
    schedule_trace.clear()
    assert f"step {stop_at}" in run_cli(RUN + ["--out", str(parts)], capsys)  # re-running resumes
    after = list(schedule_trace)

    n = 2 * STEPS_PER_EPOCH
    assert len(uninterrupted) == n
    assert before + after == uninterrupted  # exactly the same floats, step for step
    for step, (alpha, temperature) in enumerate(uninterrupted):
        assert alpha == pytest.approx(expected_alpha(step), abs=1e-12), step
        assert temperature == pytest.approx(expected_temperature(step), abs=1e-12), step

    # the per-epoch log records the schedule at the end of each epoch, identically in both runs
    logs = [logbook.read_log(out) for out in (whole, parts)]
    assert [r["alpha"] for r in logs[0]] == [r["alpha"] for r in logs[1]]
    assert [r["alpha"] for r in logs[0]] == pytest.approx([0.8 / 1.5, 0.8])
    assert [r["temperature"] for r in logs[0]] == pytest.approx([expected_temperature(8), 1.0])
    assert [r["lr"] for r in logs[0]] == pytest.approx([0.05, 0.005])

    a = checkpoint.load(whole / "last.pt")["model"]
    b = checkpoint.load(parts / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
