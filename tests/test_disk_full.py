"""A full disk while a run writes its outputs: one line naming the file, the cause and the checkpoint that is
still good, exit code 2, no temporary file left behind, and what was written before still readable.

--out lives on a real 64 MB tmpfs when the tests run as root (CI does), filled just before the write under
test; otherwise the writers are patched to fail as a full disk makes them fail (ENOSPC). TensorBoard's
writer is patched in both cases: its events go into blocks the file already holds, which a full disk
does not refuse.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
from small_data import write_fashion_mnist
from test_export import _checkpoint

from dhm_fast import checkpoint, logbook
from dhm_fast.cli import main
from dhm_fast.export import main as export_main

FULL = "no space left on device"


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class Disk:
    """--out's filesystem: after fill(), every write that needs a new block fails with ENOSPC."""

    def __init__(self, folder: Path, monkeypatch) -> None:
        self.folder, self.full = folder, False
        self.real = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True).returncode == 0
        if not self.real:  # the patched writers: atomic writes (checkpoints, JSON, PNG) and log.jsonl's appends
            keep = checkpoint._KeepsWriteErrors.write
            monkeypatch.setattr(checkpoint._KeepsWriteErrors, "write",
                                lambda f, data: self._check() or keep(f, data))
            monkeypatch.setattr(logbook, "os", _Os(self))
        from tensorboard.summary.writer.record_writer import RecordWriter

        record = RecordWriter.write
        monkeypatch.setattr(RecordWriter, "write", lambda w, data: self._check() or record(w, data))

    def _check(self) -> None:
        if self.full:
            raise enospc()

    def fill(self) -> None:
        self.full = True
        if self.real:
            with open(self.folder / "filler", "wb", buffering=0) as f:
                for chunk in (1 << 20, 4096, 1):
                    try:
                        while True:
                            f.write(b"\0" * chunk)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC

    def release(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", str(self.folder)], check=True)


class _Os:
    """The os module, as dhm_fast.logbook sees it, with a write that a full disk refuses."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk

    def write(self, fd: int, data) -> int:
        self.disk._check()
        return os.write(fd, data)

    def __getattr__(self, name: str):
        return getattr(os, name)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    folder = tmp_path / "disk"
    folder.mkdir()
    d = Disk(folder, monkeypatch)
    yield d
    d.release()


def fill_before(monkeypatch, disk: Disk, owner, name: str, when) -> None:
    """Fill the disk just before owner.name runs with arguments for which when(*args) holds."""
    original = getattr(owner, name)

    def filled_first(*args, **kwargs):
        if not disk.full and when(*args):
            disk.fill()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, filled_first)


def nth(n: int, test):
    """A `when` that holds the n-th time `test` holds."""
    seen = []

    def when(*args) -> bool:
        if test(*args):
            seen.append(args)
        return len(seen) == n

    return when


# (file under test, where the disk fills up, the checkpoint still good). A run: 2 steps an epoch, 2 epochs,
# last.pt after every step, a log record after every step.
CASES = {
    "last.pt": (checkpoint, "save_atomic", nth(2, lambda obj, path: Path(path).name == "last.pt"), 1),
    "best.pt": (checkpoint, "save_atomic", nth(1, lambda obj, path: Path(path).name == "best.pt"), 2),
    "log.jsonl": (logbook.Logbook, "append", nth(1, lambda book, record: True), None),
    "curves.png": (logbook, "draw_curves", nth(1, lambda records, title: bool(records)), 2),
    "summary.json": (checkpoint, "write_json", nth(1, lambda path, obj: path.name == "summary.json"), 4),
    "tensorboard": (logbook, "scalars", nth(3, lambda record: True), 2),  # after log.jsonl's line
}


@pytest.mark.parametrize("target", list(CASES))
def test_a_full_disk_is_one_line_naming_the_file_and_the_good_checkpoint(target, disk, tmp_path, capsys,
                                                                          monkeypatch):
    data = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=16)
    out = disk.folder / "run"
    owner, name, when, good_step = CASES[target]
    fill_before(monkeypatch, disk, owner, name, when)
    args = ["--data-dir", str(data), "--batch-size", "32", "--epochs", "2", "--save-every-steps", "1",
            "--log-every-steps", "1", "--amp", "none", "--no-channels-last", "--out", str(out)]
    code = main(args + (["--tensorboard"] if target == "tensorboard" else []))
    err = capsys.readouterr().err
    assert code == 2 and disk.full, err
    file = f"TensorBoard events in {out / 'tensorboard'}" if target == "tensorboard" else out / target
    good = (f"the last good checkpoint is {out / 'last.pt'} (step {good_step})" if good_step else
            "no checkpoint has been written yet")
    assert err.strip().splitlines() == [f"error: cannot write {file}: {FULL}; {good}"], err
    assert not [p.name for p in out.rglob("*.tmp")]
    if good_step:
        assert checkpoint.load(out / "last.pt")["progress"]["step"] == good_step
    assert logbook.read_log(out, kind=None) is not None  # no half record


def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing_behind(disk, tmp_path, capsys):
    _, path = _checkpoint(tmp_path, "resnet18")
    out = disk.folder / "export"
    out.mkdir()
    disk.fill()
    assert export_main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: cannot write {out / 'model.safetensors'}: {FULL}; the checkpoint {path} is unchanged"], err
    assert list(out.iterdir()) == []
    assert torch.load(path, weights_only=True)["num_classes"] == 7
