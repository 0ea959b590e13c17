"""What a run writes for people: log.jsonl records, TensorBoard scalars, curves.png."""

from __future__ import annotations

import json
import math

import pytest

from dhm_fast.logbook import Logbook, read_log, scalars
from dhm_fast.plots import draw_curves

HEADS = ("main", "aux1", "aux2")


def interval(step: int, steps_per_epoch: int = 10, ramp_steps: int = 10) -> dict:
    progress = step / steps_per_epoch
    return {"kind": "interval", "epoch": (step - 1) // steps_per_epoch, "step": step, "epoch_progress": progress,
            "lr": 0.1 * (1 - progress / 3), "alpha": min(1.0, (step - 1) / ramp_steps), "temperature": 1.0,
            "train": {"loss": 3.0 / step, "samples": 64,
                      "heads": {h: {"ce": 1.0 / step + i, "top1": 10.0 * i + step} for i, h in enumerate(HEADS)},
                      "kl": {"main->aux1": 0.5 / step, "aux2->main": 0.25 / step}},
            "img_per_s": 1000.0 + step}


def epoch(e: int, steps_per_epoch: int = 10) -> dict:
    return {"kind": "epoch", "epoch": e, "step": (e + 1) * steps_per_epoch, "lr": 0.1, "alpha": 1.0,
            "temperature": 1.0, "train": {"loss": 1.0, "heads": {h: {"ce": 1.0, "top1": 50.0} for h in HEADS}},
            "val": {"samples": 100, "heads": {h: {"ce": 1.0, "top1": 60.0 + e, "top5": 90.0} for h in HEADS}},
            "train_seconds": 1.0}


def two_epochs() -> list[dict]:
    records = []
    for e in range(2):
        records += [interval(s) for s in range(10 * e + 2, 10 * e + 11, 2)] + [epoch(e)]
    return records


def test_read_log_keeps_time_order_and_filters_by_kind(tmp_path):
    records = two_epochs()
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_log(tmp_path) == [r for r in records if r["kind"] == "epoch"]
    assert read_log(tmp_path / "log.jsonl", kind="interval") == [r for r in records if r["kind"] == "interval"]
    assert read_log(tmp_path, kind=None) == records


def test_scalars_are_flat_tags_of_every_number():
    tags = scalars(interval(4))
    assert tags["train/ce/aux1"] == pytest.approx(1.25) and tags["train/top1/aux2"] == 24.0
    assert tags["train/kl/main->aux1"] == 0.125 and tags["lr"] == pytest.approx(0.1 * (1 - 0.4 / 3))
    assert tags["img_per_s"] == 1004.0 and tags["train/loss"] == 0.75
    val = scalars(epoch(1))
    assert val["val/top1/main"] == 61.0 and val["val/top5/aux2"] == 90.0
    assert "train_seconds" not in val  # timing of a whole epoch is not a curve


def test_append_and_rewrite_keep_the_file_equal_to_the_records(tmp_path):
    book = Logbook(tmp_path, "t")
    records = two_epochs()
    for r in records[:3]:
        book.append(r)
    assert read_log(tmp_path, kind=None) == records[:3]
    book.rewrite(records[:2])  # a resume drops what was written after the last checkpoint
    assert read_log(tmp_path, kind=None) == records[:2]
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_tensorboard_gets_the_same_scalars_and_a_resume_purges_the_lost_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    book = Logbook(tmp_path, "t", tensorboard=True)
    for r in two_epochs()[:4]:  # steps 2, 4, 6, 8
        book.append(r)
    book.close()
    resumed = Logbook(tmp_path, "t", tensorboard=True, resume_step=6)  # the checkpoint was at step 5
    resumed.append(interval(6))
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    ce = events.Scalars("train/ce/main")
    assert [e.step for e in ce] == [2, 4, 6]
    assert [e.value for e in ce] == pytest.approx([0.5, 0.25, 1 / 6])


def test_curves_have_a_point_per_interval_and_a_readable_alpha_axis():
    records = two_epochs()
    fig = draw_curves(records, "run")
    ax_ce, ax_acc, ax_kl, ax_sched, ax_alpha = fig.axes
    assert [len(line.get_xdata()) for line in ax_ce.lines] == [10, 10, 10]  # every interval, every head
    assert list(ax_acc.lines[0].get_xdata()) == [1, 2]  # validation at the epoch ends
    colours = [line.get_color() for line in ax_ce.lines]
    assert len(set(colours)) == 3 and [line.get_color() for line in ax_acc.lines] == colours  # a colour per head
    assert list(ax_alpha.lines[0].get_ydata())[-1] == 1.0  # the ramp's end is drawn at full alpha
    fig.canvas.draw()
    assert ax_alpha.yaxis.get_offset_text().get_text() == ""  # no "1e-9 + 9.99e-1" offset labels
    assert ax_alpha.get_ylim()[0] == 0.0 and ax_alpha.get_ylim()[1] == pytest.approx(1.05)
    assert [line.get_label() for line in ax_kl.lines] == ["aux2->main", "main->aux1"]


def test_curves_of_a_baseline_run_say_there_is_no_mimicking():
    records = [dict(r, train=dict(r["train"], kl={})) for r in two_epochs()]
    fig = draw_curves(records)
    assert any("no mimicking terms" in t.get_text() for t in fig.axes[2].texts)
    assert draw_curves([]) is None
    assert all(math.isfinite(v) for v in fig.axes[3].lines[0].get_ydata())
