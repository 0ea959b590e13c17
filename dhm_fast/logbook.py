"""What a run writes for people to read: log.jsonl, optional TensorBoard event files, curves.png
(docs/configuration.md, "What a run writes", describes the records)."""

from __future__ import annotations

import json
from pathlib import Path

from dhm_fast.errors import UserError
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
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step or None)

    def rewrite(self, records: list[dict]) -> None:
        """log.jsonl as the checkpoint knows it (atomic), and the curves drawn from it."""
        tmp = self.out / f".{LOG}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.out / LOG)
        fig = draw_curves(records, self.title)
        if fig is not None:
            fig.savefig(self.out / CURVES, dpi=90)

    def append(self, record: dict) -> None:
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for tag, value in scalars(record).items():
                self.writer.add_scalar(tag, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
