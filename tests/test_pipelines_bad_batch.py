"""A training file that fails to decode costs no step (torchvision loader): it is reported and replaced by the
next decodable file of the process's shard, so a batch of nothing but broken files is still a full batch and
every process of a DDP job runs the same number of steps (one step short, its peers would wait in the
gradient all-reduce until --dist-timeout)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from pipeline_helpers import small_config, write_undecodable_png
from test_distributed import ROOT, env, torchrun_cmd

from dhm_fast import checkpoint, logbook
from pipelines import create_loaders
from pipelines.imagefolder import scan_dataset
from pipelines.sample_data import write_imagefolder
from pipelines.sharding import epoch_indices

BATCH = 2  # per process; 12 training files on 2 processes: 3 steps an epoch


def break_first_batch(root: Path, cache: Path, rank: int, world_size: int) -> tuple[list[str], list[int]]:
    """Make every file of `rank`'s first training batch of epoch 0 undecodable (headers stay valid);
    returns the file list and that process's shard order."""
    cfg = small_config(root, cache, rank=rank, world_size=world_size)
    files = scan_dataset(cfg)[0].files
    order = epoch_indices(len(files), rank=rank, world_size=world_size, shuffle=True, seed=cfg.seed, epoch=0)
    for i in order[:BATCH]:
        write_undecodable_png(Path(files[i]))
    return files, order.tolist()


@pytest.fixture
def dataset(tmp_path):
    return write_imagefolder(tmp_path / "data", num_classes=2, train_per_class=6, val_per_class=1, odd_files=False)


def test_a_batch_of_undecodable_files_is_replaced_from_the_shard(dataset, tmp_path):
    files, order = break_first_batch(dataset.root, tmp_path / "probe", rank=1, world_size=2)
    broken = [files[i] for i in order[:BATCH]]
    runs = []
    for workers in (0, 2):
        cfg = small_config(dataset.root, tmp_path / f"cache{workers}", backend="torchvision", batch_size=BATCH,
                           rank=1, world_size=2, num_workers=workers)
        train, _ = create_loaders(cfg)
        train.set_epoch(0)
        batches = list(train)
        assert len(batches) == len(train) == 3 and all(len(labels) == BATCH for _, labels in batches)
        assert sorted(path for path, _ in train.skipped) == sorted(broken)  # reported as before
        runs.append(batches)
    # Both broken files are replaced by the next decodable one of the shard, with their own crops.
    label = scan_dataset(small_config(dataset.root, tmp_path / "probe"))[0].labels[order[BATCH]]
    assert runs[0][0][1].tolist() == [label, label]
    for (a, la), (b, lb) in zip(*runs, strict=True):  # the same whatever the worker count
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.slow
def test_ddp_runs_every_step_when_one_process_gets_a_batch_of_broken_files(dataset, tmp_path):
    files, order = break_first_batch(dataset.root, tmp_path / "probe", rank=1, world_size=2)
    out = tmp_path / "run"
    args = ["--data", "imagenet", "--loader", "torchvision", "--data-dir", str(dataset.root), "--arch", "resnet20",
            "--batch-size", str(2 * BATCH), "--epochs", "1", "--amp", "none", "--no-channels-last",
            "--num-workers", "0", "--image-size", "16", "--val-resize", "20", "--dist-timeout", "30",
            "--out", str(out)]
    result = subprocess.run(torchrun_cmd(str(ROOT / "train.py"), *args), capture_output=True, text=True, cwd=ROOT,
                            env=env(XDG_CACHE_HOME=str(tmp_path / "xdg")), timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert checkpoint.load(out / "last.pt")["progress"]["step"] == 3
    assert logbook.read_log(out)[0]["train"]["samples"] == 12  # both processes ran 3 full steps
    assert all(files[i] in output for i in order[:BATCH])  # rank 1 reported what it could not decode
