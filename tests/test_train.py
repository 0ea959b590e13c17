"""The trainer end to end on real Fashion-MNIST slices: learning, exact resume, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dhm_fast import checkpoint
from dhm_fast.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist not installed")

QUICK = ["--train-subset", "256", "--batch-size", "32", "--epochs", "2", "--lr", "0.05",
         "--lr-schedule", "multistep", "--milestones", "1", "--amp", "none", "--no-channels-last"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@needs_fashion
def test_a_short_real_run_learns_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(QUICK + ["--train-subset", "1024", "--epochs", "3", "--out", str(out)], capsys)
    assert code == 0
    log = read_log(out)
    assert len(log) == 3
    assert log[-1]["train"]["loss"] < 0.8 * log[0]["train"]["loss"]
    assert log[-1]["val"]["heads"]["main"]["top1"] > 50  # 10 classes: chance is 10%
    assert set(log[-1]["val"]["heads"]) == {"main", "aux1", "aux2"}
    assert {"main->aux1", "aux2->main"} <= set(log[-1]["train"]["kl"])
    for name in ("last.pt", "best.pt", "curves.png", "summary.json", "config.json"):
        assert (out / name).is_file(), name
    assert "main  top-1" in stdout and "aux2  top-1" in stdout and str(out) in stdout
    # evaluating best.pt reproduces the best epoch's validation accuracy
    summary = json.loads((out / "summary.json").read_text())
    code, stdout, _ = run_cli(["--eval-only", "--weights", str(out / "best.pt"), "--amp", "none",
                               "--no-channels-last"], capsys)
    assert code == 0
    assert f"main  top-1 {summary['best_main_top1']:6.2f}%" in stdout


@needs_fashion
@pytest.mark.parametrize("stop_at", [5, 8, 11])  # mid-epoch, at the epoch boundary, in epoch 2
def test_resume_after_interrupt_equals_the_uninterrupted_run(tmp_path, capsys, stop_at):
    common = QUICK + ["--deterministic", "--branch-prob", "0.6", "--alpha-ramp", "linear",
                      "--alpha-ramp-epochs", "1.5"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(common + ["--out", str(whole)], capsys)[0] == 0
    assert run_cli(common + ["--out", str(parts), "--max-steps", str(stop_at)], capsys)[0] == 0
    assert checkpoint.load(parts / "last.pt")["progress"]["step"] == stop_at
    code, stdout, _ = run_cli(common + ["--out", str(parts)], capsys)  # re-running into --out resumes
    assert code == 0 and f"step {stop_at}" in stdout
    a = checkpoint.load(whole / "last.pt")["model"]
    b = checkpoint.load(parts / "last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(whole)[-1]["val"] == read_log(parts)[-1]["val"]


@needs_fashion
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(QUICK + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    good = checkpoint.load(out / "last.pt")
    code, _, err = run_cli(QUICK + ["--epochs", "2", "--lr", "1e30", "--out", str(out)], capsys)
    assert code == 2
    assert "non-finite at step" in err and "last.pt" in err and len(err.strip().splitlines()) == 1
    kept = checkpoint.load(out / "last.pt")
    assert kept["progress"]["step"] == good["progress"]["step"]
    assert all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])


@needs_fashion
def test_resuming_with_another_architecture_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(QUICK + ["--epochs", "1", "--out", str(out)], capsys)[0] == 0
    code, _, err = run_cli(QUICK + ["--arch", "resnet32", "--out", str(out)], capsys)
    assert code == 2 and "trained with --arch resnet20, not resnet32" in err
    code, _, err = run_cli(["--eval-only", "--weights", str(out / "best.pt"), "--arch", "resnet32"], capsys)
    assert code == 2 and "does not fit a resnet32" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipe", "nope"], "unknown recipe 'nope'; choose one of .*imagenet-resnet152"),
        (["--arch", "resnet9"], "argument --arch: invalid choice: 'resnet9'.*resnet152"),
        (["--method", "kd"], "argument --method: invalid choice: 'kd'.*dhm"),
        (["--data-dir", "/nonexistent/fm"], "missing train-images-idx3-ubyte.gz.*expected the four files"),
        (["--data", "imagenet", "--data-dir", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
        (["--amp", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
        (["--eval-only"], "--eval-only needs --weights"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--aux-weight", "-0.5"], "--aux-weight must be a finite number >= 0, got -0.5"),
    ],
)
def test_bad_input_gets_one_line_and_exit_code_2(args, message):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--out", "/tmp/unused-dhm-run"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    import re

    assert re.search(message, lines[0]), lines[0]


@needs_fashion
def test_aux_weight_scales_every_auxiliary_cross_entropy(tmp_path, capsys, monkeypatch):
    import dhm_fast.engine

    seen = []
    real_loss = dhm_fast.engine.dhm_loss

    def recording_loss(*args, **kwargs):
        seen.append(kwargs["ce_weights"])
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(dhm_fast.engine, "dhm_loss", recording_loss)
    code, _, err = run_cli(QUICK + ["--aux-weight", "0.25", "--max-steps", "2", "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert seen == [(1.0, 0.25, 0.25)] * 2  # main head, then aux1 and aux2


def test_help_and_recipe_list(capsys):
    code, out, _ = run_cli(["--list-recipes"], capsys)
    assert code == 0 and "imagenet-resnet152" in out and "cifar100-densenet-bc-100-12" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--branch-prob" in capsys.readouterr().out
