"""What a run writes for people to read: log.jsonl, optional TensorBoard event files, curves.png
(docs/configuration.md, "What a run writes", describes the records)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

from dhm_fast.checkpoint import write_atomic
from dhm_fast.errors import UserError, WriteError
from dhm_fast.plots import draw_curves

LOG = "log.jsonl"
CURVES = "curves.png"


def read_log(path: str | Path, kind: str | None = "epoch") -> list[dict]:
    """The records of one kind ("interval" or "epoch"; None: all) of a run's log.jsonl or its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers as flat TensorBoard tags, e.g. train/ce/aux1, val/top1/main, lr."""
    out = {key: record[key] for key in ("lr", "alpha", "temperature", "img_per_s") if key in record}
    for split in ("train", "val"):
        part = record.get(split) or {}
        if part.get("loss") is not None:
            out[f"{split}/loss"] = part["loss"]
        for head, values in part.get("heads", {}).items():
            out.update({f"{split}/{name}/{head}": v for name, v in values.items() if v is not None})
        out.update({f"{split}/kl/{pair}": v for pair, v in part.get("kl", {}).items()})
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float)}


class Logbook:
    """Writes a run's records; only the process that owns the output folder makes one."""

    def __init__(self, out: Path, title: str, tensorboard: bool = False, resume_step: int = 0) -> None:
        self.out, self.title = out, title
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            # purge_step drops the events a killed run wrote after its last checkpoint.
            _quiet_tensorboard_threads()
            with self._events():
                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step or None)

    def rewrite(self, records: list[dict]) -> None:
        """log.jsonl as the checkpoint knows it (atomic), and the curves drawn from it."""
        text = "".join(json.dumps(r) + "\n" for r in records).encode()
        write_atomic(self.out / LOG, lambda f: f.write(text))
        fig = draw_curves(records, self.title)
        if fig is not None:
            write_atomic(self.out / CURVES, lambda f: fig.savefig(f, format="png", dpi=90))

    def append(self, record: dict) -> None:
        _append(self.out / LOG, (json.dumps(record) + "\n").encode())
        if self.writer is not None:
            with self._events():
                for tag, value in scalars(record).items():
                    self.writer.add_scalar(tag, value, record["step"])
                self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            with self._events():
                self.writer.close()

    @contextlib.contextmanager
    def _events(self):
        """TensorBoard writes from a thread of its own and hands its OSError over at the next flush."""
        try:
            yield
        except OSError as e:
            raise WriteError(f"TensorBoard events in {self.out / 'tensorboard'}", e) from None


def _quiet_tensorboard_threads() -> None:
    """TensorBoard's writer thread ends on an OSError (a full disk) with a traceback; the same error
    reaches the trainer at its next flush, which tells it in one line (Logbook._events)."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


def _append(path: Path, data: bytes) -> None:
    """Append data whole or not at all: a failed write (a full disk) is cut off again, so log.jsonl never
    ends in half a record (truncating needs no free space)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteError(path, e) from None
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        os.ftruncate(fd, end)
        raise WriteError(path, e) from None
    finally:
        os.close(fd)
