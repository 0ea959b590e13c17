"""Worker processes for tests/test_distributed.py (started by torchrun or as plain subprocesses).

    python tests/dist_worker.py train RECORD_DIR -- <train.py flags>
        The real trainer (dhm_fast.run.Run), instrumented: every process records the sample indices
        of each micro-batch it trained on (checked against the labels it was actually given), the
        active head set of every step, and its final weights, under RECORD_DIR/rank<R>.pt.

    python tests/dist_worker.py compile RECORD_DIR -- <train.py flags with --compile>
        The real trainer with torch.compile's backend replaced by one that counts the graphs Dynamo
        hands it (and runs them eagerly): every process records, per compiled frame, the branch pattern
        of the step that triggered it, under RECORD_DIR/rank<R>.pt.

    python tests/dist_worker.py accum OUT_FILE GRAD_ACCUM
        A few optimizer steps of dhm_fast.engine.train_one_epoch on a norm-free 3-head test model and
        fixed data with a global batch of 16, split over the processes and GRAD_ACCUM micro-batches;
        rank 0 saves the final weights and the last step's gradients.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # two processes share two cores

from dhm_fast import distributed  # noqa: E402
from dhm_fast.engine import Progress, StepParts, train_one_epoch  # noqa: E402
from dhm_fast.losses import LossConfig  # noqa: E402
from dhm_fast.metrics import TrainMeter  # noqa: E402
from dhm_fast.sampling import BranchSampler  # noqa: E402
from dhm_fast.schedules import LRSchedule, Ramp  # noqa: E402


class Recorder:
    """Wraps a MemoryLoader: records the sample indices behind every batch it yields."""

    def __init__(self, loader, log: list) -> None:
        self.inner, self.log = loader, log

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch
        self.inner.set_epoch(epoch, start_batch=start_batch)

    def __iter__(self):
        order = self.inner.indices()
        bs = self.inner.batch_size
        for b, (images, labels) in enumerate(self.inner, start=self.start):
            idx = order[b * bs: (b + 1) * bs]
            assert torch.equal(labels, self.inner.labels[idx]), "recorded indices do not match the batch"
            self.log.append((self.epoch, idx.tolist()))
            yield images, labels


def run_train(record_dir: Path, argv: list[str]) -> int:
    from dhm_fast.cli import build_parser
    from dhm_fast.config import build_config
    from dhm_fast.run import Run

    overrides = vars(build_parser().parse_args(argv))
    overrides.pop("list_recipes")
    cfg = build_config(overrides.pop("recipe"), overrides)
    run = Run(cfg)
    samples: list = []
    actives: list = []
    run.train_loader = Recorder(run.train_loader, samples)
    sampler = run.parts.sampler
    original = sampler.active

    def recording_active(epoch: int, step: int):
        flags = original(epoch, step)
        actives.append((step, flags))
        return flags

    sampler.active = recording_active
    run.train()
    record_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"samples": samples, "actives": actives, "state": run.model.state_dict(),
                "world_size": run.world.world_size},
               record_dir / f"rank{run.world.rank}.pt")
    return 0


def run_compile_count(record_dir: Path, argv: list[str]) -> int:
    import torch._dynamo

    from dhm_fast.cli import build_parser
    from dhm_fast.config import build_config
    from dhm_fast.run import Run

    compiles: list = []
    steps: list = []
    current: dict = {}

    def counting_backend(gm, example_inputs):
        compiles.append(current.get("pattern"))
        return gm.forward

    real_compile = torch.compile
    torch.compile = lambda model, **kwargs: real_compile(model, backend=counting_backend)
    overrides = vars(build_parser().parse_args(argv))
    overrides.pop("list_recipes")
    run = Run(build_config(overrides.pop("recipe"), overrides))
    sampler = run.parts.sampler
    original = sampler.active

    def noting_active(epoch: int, step: int):
        current["pattern"] = original(epoch, step)
        steps.append(current["pattern"])
        return current["pattern"]

    sampler.active = noting_active
    run.train()
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    record_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"compiles": compiles, "steps": steps, "frames": frames, "ddp": run.world.distributed},
               record_dir / f"rank{run.world.rank}.pt")
    return 0


class ThreeHeads(nn.Module):
    """A norm-free stand-in for a branched net: shared trunk, main head, two skippable branches."""

    num_heads = 3

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(12, 32), nn.Tanh())
        self.main = nn.Linear(32, 5)
        self.aux1 = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 5))
        self.aux2 = nn.Linear(12, 5)

    def forward(self, x, active=(True, True, True)):
        h = self.trunk(x)
        return (self.main(h), self.aux1(h) if active[1] else None, self.aux2(x) if active[2] else None)


GLOBAL_BATCH, STEPS = 16, 4


def run_accum(out: Path, grad_accum: int) -> int:
    world, device = distributed.init("cpu", 30.0)
    torch.manual_seed(0)
    model = ThreeHeads()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 12, generator=g)
    y = torch.randint(0, 5, (STEPS, GLOBAL_BATCH), generator=g)
    parts_per_step = world.world_size * grad_accum
    micro = GLOBAL_BATCH // parts_per_step
    # Micro-batch j of a step holds samples [j*micro, (j+1)*micro); process r takes j = r*accum + i.
    batches = []
    for s in range(STEPS):
        for i in range(grad_accum):
            j = world.rank * grad_accum + i
            batches.append((x[s, j * micro: (j + 1) * micro], y[s, j * micro: (j + 1) * micro]))
    sampler = BranchSampler(3, 0.5, "step", seed=4)  # every pattern; aux1 only at the end
    net = distributed.wrap_ddp(model, device, find_unused_parameters=not sampler.always_all)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    parts = StepParts(
        model=net, optimizer=optimizer, scaler=None, autocast=contextlib.nullcontext,
        lr=LRSchedule(0.1, "constant"), alpha=Ramp(1.0), temperature=Ramp(2.0), sampler=sampler,
        loss=LossConfig(method="dhm", direction="both", eps=1e-8, label_smoothing=0.0, reference=True),
    )
    meter = TrainMeter(3, device)
    train_one_epoch(parts, batches, Progress(), meter, steps_per_epoch=STEPS, log_every=10**6,
                    grad_accum=grad_accum)
    actives = [sampler.active(0, s) for s in range(STEPS)]
    if world.is_main:
        grads = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
        torch.save({"weights": {k: v.clone() for k, v in model.state_dict().items()}, "grads": grads,
                    "actives": actives}, out)
    distributed.destroy()
    return 0


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        assert sys.argv[3] == "--"
        sys.exit(run_train(Path(sys.argv[2]), sys.argv[4:]))
    if mode == "compile":
        assert sys.argv[3] == "--"
        sys.exit(run_compile_count(Path(sys.argv[2]), sys.argv[4:]))
    if mode == "accum":
        sys.exit(run_accum(Path(sys.argv[2]), int(sys.argv[3])))
    raise SystemExit(f"unknown mode {mode!r} (pid {os.getpid()})")
