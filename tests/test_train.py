"""The trainer end to end on real Fashion-MNIST slices and tiny generated datasets: learning, exact
resume, clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_helpers import require_extra, write_undecodable_png
from small_data import truncate, write_cifar10, write_fashion_mnist

from dhm_fast import checkpoint
from dhm_fast.cli import main
from pipelines.sample_data import write_imagefolder

FASHION = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist not installed")

QUICK = ["--train-subset", "256", "--batch-size", "32", "--epochs", "2", "--lr", "0.05",
         "--lr-schedule", "multistep", "--milestones", "1", "--amp", "none", "--no-channels-last"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def read_log(out: Path, kind: str | None = None) -> list[dict]:
    """The records of log.jsonl, all of them or those of one kind ("interval" or "epoch")."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r["kind"] == kind]


@needs_fashion
def test_a_short_real_run_learns_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(QUICK + ["--train-subset", "1024", "--epochs", "3", "--out", str(out)], capsys)
    assert code == 0
    log = read_log(out, "epoch")
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


@pytest.mark.parametrize("stop_at", [5, 8, 11])  # mid-epoch, at the epoch boundary, in epoch 2
def test_resume_after_interrupt_equals_the_uninterrupted_run(tmp_path, capsys, stop_at):
    data = write_fashion_mnist(tmp_path / "fm", n_train=256, n_test=64)  # 8 steps an epoch
    common = QUICK + ["--deterministic", "--branch-prob", "0.6", "--alpha-ramp", "linear",
                      "--alpha-ramp-epochs", "1.5", "--data-dir", str(data)]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(common + ["--out", str(whole)], capsys)[0] == 0
    assert run_cli(common + ["--out", str(parts), "--max-steps", str(stop_at)], capsys)[0] == 0
    assert checkpoint.load(parts / "last.pt")["progress"]["step"] == stop_at
    code, stdout, _ = run_cli(common + ["--out", str(parts)], capsys)  # re-running into --out resumes
    assert code == 0 and f"step {stop_at}" in stdout
    assert_identical(without_timing(read_log(whole)), without_timing(read_log(parts)), "log")
    a, b = checkpoint.load(whole / "last.pt"), checkpoint.load(parts / "last.pt")
    assert a.keys() == b.keys()
    for key in a.keys() - {"config", "provenance"}:  # configs differ in --out; provenance in the git commit
        assert_identical(without_timing(a[key]), without_timing(b[key]), key)


# Keys of log records and checkpoints that hold wall-clock measurements: the only things two
# identical runs may disagree on.
TIMING_KEY = re.compile(r"seconds|per_s|time")


def without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not TIMING_KEY.search(str(k))}
    if isinstance(value, list | tuple):
        return [without_timing(v) for v in value]
    return value


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Equal structure and values, tensors bitwise (dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# Dropout draws from the global RNG at every step, so a resume that does not restore the RNG
# states diverges (DenseNet-40-12: 15 MB of weights, so checkpoints stay quick; 8x8 images keep the
# steps cheap). 4 steps per epoch, a record every 3 steps.
DROPOUT_RUN = ["--arch", "densenet_40_12", "--dropout", "0.2", "--method", "dhm", "--branch-prob", "0.6",
               "--batch-size", "8", "--epochs", "2", "--lr", "0.05", "--lr-schedule", "multistep",
               "--milestones", "1", "--log-every-steps", "3", "--amp", "none", "--no-channels-last",
               "--deterministic", "--num-workers", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [2, 5])  # mid-interval in epoch 1; one step into epoch 2
def test_resume_with_dropout_reproduces_every_record_and_the_rng(tmp_path, capsys, stop_at):
    data = write_fashion_mnist(tmp_path / "fm", n_train=32, n_test=8, side=8)
    common = DROPOUT_RUN + ["--data-dir", str(data)]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(common + ["--out", str(whole)], capsys)[0] == 0
    assert run_cli(common + ["--out", str(parts), "--max-steps", str(stop_at)], capsys)[0] == 0
    stopped = checkpoint.load(parts / "last.pt")
    assert stopped["progress"]["step"] == stop_at
    assert stopped["meter"]["samples"] > 0  # stopped mid-epoch: the meter holds steps to carry over
    code, stdout, _ = run_cli(common + ["--out", str(parts)], capsys)
    assert code == 0 and f"step {stop_at}" in stdout
    # Every record, training intervals included, every field apart from timings.
    log_whole, log_parts = read_log(whole), read_log(parts)
    assert {r["kind"] for r in log_whole} == {"interval", "epoch"} and len(log_whole) > 4
    assert_identical(without_timing(log_whole), without_timing(log_parts), "log")
    # The final checkpoints: weights, optimizer, meter, RNG states (torch and Python), history.
    a, b = checkpoint.load(whole / "last.pt"), checkpoint.load(parts / "last.pt")
    assert a.keys() == b.keys() and {"rng", "meter", "model", "optimizer"} <= a.keys()
    for key in a.keys() - {"config", "provenance"}:  # configs differ in --out; provenance in the git commit
        assert_identical(without_timing(a[key]), without_timing(b[key]), key)


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
        (["--aux-weight", "-0.5"], "--aux-weight must be at least 0, got -0.5"),
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


def run_train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


# A C library inside DALI's decoder writes its own diagnostics straight to the stderr file descriptor.
NATIVE_DECODER_NOISE = re.compile(r"^libpng (error|warning):")


def assert_one_line_error_naming(result: subprocess.CompletedProcess, path: Path) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not NATIVE_DECODER_NOISE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(path) in lines[0], lines[0]


SMOKE = ["--arch", "resnet20", "--batch-size", "4", "--epochs", "1", "--max-steps", "1", "--amp", "none",
         "--num-workers", "1"]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_a_damaged_dataset_file_is_named_in_one_line_with_exit_code_2(tmp_path, dataset, damage):
    if dataset == "fashion-mnist":
        folder = write_fashion_mnist(tmp_path / "data", n_train=16, n_test=8)
        bad = folder / ("t10k-labels-idx1-ubyte.gz" if damage == "missing" else "train-images-idx3-ubyte.gz")
    else:
        folder = write_cifar10(tmp_path / "data")
        bad = folder / ("test_batch" if damage == "missing" else "data_batch_2")
    if damage == "missing":
        bad.unlink()
        name: Path = Path(bad.name)  # listed among the files the folder lacks
    else:
        truncate(bad)
        name = bad
    result = run_train(SMOKE + ["--data", dataset, "--data-dir", str(tmp_path / "data"),
                                "--out", str(tmp_path / "run")])
    assert_one_line_error_naming(result, name)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.fixture
def dali_folder(tmp_path):
    require_extra("nvidia.dali", "NVIDIA DALI")
    return tmp_path


IMAGE_FOLDER = ["--data", "imagenet", "--loader", "dali", "--strict-data", "--image-size", "16",
                "--val-resize", "20"]


def test_dali_strict_data_names_a_broken_jpeg_in_one_line(dali_folder):
    ds = write_imagefolder(dali_folder / "data", num_classes=2, train_per_class=3, val_per_class=2, seed=3)
    result = run_train(SMOKE + IMAGE_FOLDER + ["--data-dir", str(ds.root), "--out", str(dali_folder / "run")])
    assert_one_line_error_naming(result, ds.root / "train" / ds.classes[0] / "train_garbage.JPEG")


def test_dali_strict_data_names_a_file_that_fails_only_at_decode_time(dali_folder):
    # A valid header, so only DALI's decoder finds it; the batch of all 7 training files holds it.
    ds = write_imagefolder(dali_folder / "data", num_classes=2, train_per_class=3, val_per_class=2,
                           odd_files=False, seed=3)
    bad = ds.root / "train" / ds.classes[1] / "zz_broken.JPEG"
    write_undecodable_png(bad)
    args = SMOKE + IMAGE_FOLDER + ["--batch-size", "7", "--data-dir", str(ds.root), "--out", str(dali_folder / "run")]
    assert_one_line_error_naming(run_train(args), bad)


@needs_fashion
def test_aux_weight_scales_every_auxiliary_cross_entropy(tmp_path, capsys, monkeypatch):
    from dhm_fast.losses import LossConfig

    seen = []
    real_compute = LossConfig.compute

    def recording_compute(self, *args, **kwargs):
        seen.append(self.ce_weights)
        return real_compute(self, *args, **kwargs)

    monkeypatch.setattr(LossConfig, "compute", recording_compute)
    code, _, err = run_cli(QUICK + ["--aux-weight", "0.25", "--max-steps", "2", "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert seen == [(1.0, 0.25, 0.25)] * 2  # main head, then aux1 and aux2


def test_help_and_recipe_list(capsys):
    code, out, _ = run_cli(["--list-recipes"], capsys)
    assert code == 0 and "imagenet-resnet152" in out and "cifar100-densenet-bc-100-12" in out
    origin = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert origin["imagenet-resnet152"] == origin["market1501-resnet50"] == "paper"
    assert origin["imagenet-resnet152-budget16"] == origin["fashion-mnist-resnet20"] == "ours"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--branch-prob" in capsys.readouterr().out


def test_weights_while_training_is_named_and_outputs_lists_only_written_files(tmp_path, capsys):
    data = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=16)
    out = tmp_path / "run"
    code, stdout, err = run_cli(["--data-dir", str(data), "--batch-size", "32", "--max-steps", "1", "--amp", "none",
                                 "--no-channels-last", "--weights", str(tmp_path / "w.pt"), "--out", str(out)], capsys)
    assert code == 0 and err.splitlines() == [
        "warning: --weights has no effect: only --eval-only reads it; to start training from weights, "
        "use --init-weights"], err
    # stopped before any evaluation and any training record: no best.pt, no curves.png
    written = f"last {out / 'last.pt'}, log {out / 'log.jsonl'}"
    assert stdout.splitlines()[-1] == f"outputs: {written}"
    assert json.loads((out / "summary.json").read_text())["outputs"] == {"last": str(out / "last.pt"),
                                                                        "log": str(out / "log.jsonl")}
