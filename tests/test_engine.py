"""The training step never waits for the device: no scalar read and no new host data inside a step.

On a GPU, reading a device value on the host (`.item()`, `bool(t)`, `.tolist()`) or copying fresh host
data to the device (`torch.tensor(..., device=...)`) stalls the host until the queued kernels finish.
This machine has no GPU, so the test watches the operators instead, under a TorchDispatchMode:

- a scalar read is `aten._local_scalar_dense` (behind `.item()`, `bool()`, `int()`, `float()`), on any tensor;
- new host data is `aten.lift_fresh` (behind `torch.tensor(data)`): on a GPU it is a host-to-device copy,
  on the CPU this operator is its only trace; a copy between the CPU and another device counts as well;
- `.tolist()` and `.numpy()` skip the dispatcher on the CPU, so they are counted by a patch, on tensors
  derived from the model, the batch or the running metrics ("device data"; the branch sampler's host-side
  draw is not). Derivation is tracked through every operator the mode sees.

The engine may sync where it reports (the non-finite check and the log callback); those are excluded.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from dhm_fast import engine
from dhm_fast.config import TrainConfig
from dhm_fast.engine import Progress, step_parts, train_one_epoch
from dhm_fast.metrics import TrainMeter
from dhm_fast.models import create_model
from dhm_fast.optim import build_optimizer
from dhm_fast.sampling import BranchSampler

aten = torch.ops.aten
NEW_HOST_DATA = (aten.lift_fresh, aten.lift_fresh_copy)
COPIES = (aten._to_copy, aten.copy_)


class HostDeviceTraffic(TorchDispatchMode):
    """Records (phase, what, operator) for every scalar read and every host data entering the device."""

    def __init__(self, roots: list[torch.Tensor]) -> None:
        super().__init__()
        self.events: list[tuple[str, str, str]] = []
        self.phase = "setup"
        self.paused = False
        self.device_data = WeakIdKeyDictionary()
        for t in roots:
            self.device_data[t] = True

    def record(self, what: str, op: object) -> None:
        if not self.paused:
            self.events.append((self.phase, what, str(op)))

    def is_device_data(self, t: torch.Tensor) -> bool:
        return t in self.device_data

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if packet is aten._local_scalar_dense:
            self.record("scalar read", func)
        elif packet in NEW_HOST_DATA:
            self.record("new host data", func)
        elif packet in COPIES:
            src = inputs[-1] if packet is aten.copy_ else inputs[0]
            dst = inputs[0].device if packet is aten.copy_ else kwargs.get("device") or src.device
            if (src.device.type == "cpu") != (torch.device(dst).type == "cpu"):
                self.record("host-device copy", func)
        out = func(*args, **kwargs)
        if any(self.is_device_data(t) for t in inputs):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.device_data[t] = True
        return out


@contextlib.contextmanager
def watching(monkeypatch, roots: list[torch.Tensor]):
    """The mode, with `.tolist()` / `.numpy()` of device data counted and the engine's reporting excluded."""
    mode = HostDeviceTraffic(roots)

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            if mode.is_device_data(self):
                mode.record("host read", f"Tensor.{name}")
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    raise_if_bad = engine._raise_if_bad

    def reporting(bad_step: torch.Tensor) -> None:
        # The engine's designed sync at log and checkpoint time: from its non-finite check until the
        # next batch is fetched (the log record, the callback, a checkpoint) nothing is counted.
        mode.paused = True
        raise_if_bad(bad_step)

    monkeypatch.setattr(engine, "_raise_if_bad", reporting)
    with mode:
        yield mode


def _batches(mode: HostDeviceTraffic, images: torch.Tensor, labels: torch.Tensor, per_step: int = 1):
    """The micro-batches of an epoch; a step starts with its first, so events carry the step's number."""
    for i in range(len(images)):
        mode.phase, mode.paused = f"step {i // per_step}", False
        yield images[i], labels[i]


def test_the_counter_sees_every_kind_of_stall(monkeypatch):
    weight = torch.nn.Parameter(torch.randn(3))
    with watching(monkeypatch, [weight]) as mode:
        mode.phase = "probe"
        host_draw = torch.rand(3, generator=torch.Generator().manual_seed(0)).tolist()  # host side: allowed
        y = weight * 2
        y.sum().item()
        y.tolist()
        bool(y[0] > 0)
        torch.tensor([0, 2])
        y.to("meta")
    assert len(host_draw) == 3
    assert [what for _, what, _ in mode.events] == ["scalar read", "host read", "scalar read", "new host data",
                                                   "host-device copy"]


LOG_EVERY = 4


def _checked_steps(monkeypatch, method: str, branch_prob: float, reference: bool = False,
                   scaler: torch.amp.GradScaler | None = None, grad_accum: int = 1, device: str = "cpu") -> list:
    """Two log intervals of training; the events of the second one's steps."""
    torch.manual_seed(0)
    device = torch.device(device)
    cfg = TrainConfig(arch="resnet20", method=method, branch_prob=branch_prob, lr=0.05, momentum=0.9,
                      reference_loss=reference)
    model = create_model(cfg.arch, 10, method=method, in_channels=1).to(device)
    optimizer = build_optimizer(model, cfg, device)
    sampler = BranchSampler(model.num_heads, branch_prob, "step", seed=3)
    parts = step_parts(cfg, model, optimizer, scaler, contextlib.nullcontext, sampler)
    meter = TrainMeter(model.num_heads, device)
    steps = 2 * LOG_EVERY
    images = torch.randn(steps * grad_accum, 4, 1, 8, 8, device=device)
    labels = torch.randint(0, 10, (steps * grad_accum, 4), device=device)
    roots = [*model.parameters(), *model.buffers(), images, labels, *vars(meter).values()]
    roots += [t for s in optimizer.state.values() for t in s.values()]
    logged: list[int] = []
    with watching(monkeypatch, [t for t in roots if isinstance(t, torch.Tensor)]) as mode:
        train_one_epoch(parts, _batches(mode, images, labels, grad_accum), Progress(), meter,
                        steps_per_epoch=steps, log_every=LOG_EVERY, grad_accum=grad_accum,
                        on_log=lambda info: logged.append(info["step"]))
    assert logged == [LOG_EVERY, 2 * LOG_EVERY]
    # The first use of a branch pattern builds its loss constants on the device, once per run. The seed
    # makes the first interval draw every pattern, and the checked second one skip branches.
    if branch_prob < 1 and method != "baseline":
        assert len({sampler.active(0, s) for s in range(LOG_EVERY)}) == 4
        assert not all(all(sampler.active(0, s)) for s in range(LOG_EVERY, steps))
    return [e for e in mode.events if int(e[0].split()[1]) >= LOG_EVERY]


@pytest.mark.parametrize("branch_prob", [0.5, 1.0])
@pytest.mark.parametrize("method", ["baseline", "dsl", "dhm"])
@pytest.mark.parametrize("reference", [False, True], ids=["default-backend", "reference-loss"])
def test_no_host_device_sync_inside_a_training_step(monkeypatch, method, branch_prob, reference):
    events = _checked_steps(monkeypatch, method, branch_prob, reference)
    assert events == [], f"{method}, branch_prob {branch_prob}: host-device traffic inside steps: {events}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("branch_prob", [0.5, 1.0])
@pytest.mark.parametrize("method", ["baseline", "dsl", "dhm"])
def test_no_host_device_sync_inside_a_training_step_on_cuda(monkeypatch, method, branch_prob):
    """The same on a GPU, where a copy between host and device is seen as the copy it is."""
    events = _checked_steps(monkeypatch, method, branch_prob, device="cuda")
    assert events == [], f"{method}, branch_prob {branch_prob}: host-device traffic inside steps: {events}"


def test_no_sync_with_a_grad_scaler_and_accumulation(monkeypatch):
    """fp16's path: the GradScaler's scale, fused-SGD step and update, over two micro-batches a step."""
    events = _checked_steps(monkeypatch, "dhm", 0.5, scaler=torch.amp.GradScaler("cpu"), grad_accum=2)
    assert events == [], f"host-device traffic inside steps: {events}"


class ThreeHeads(torch.nn.Module):
    """A norm-free 3-head model: a batch's gradient is the mean of its samples' (no batch statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.main = torch.nn.Linear(6, 8), torch.nn.Linear(8, 5)
        self.aux1, self.aux2 = torch.nn.Linear(8, 5), torch.nn.Linear(6, 5)

    def forward(self, x, active=(True, True, True)):
        h = torch.tanh(self.trunk(x))
        return self.main(h), self.aux1(h) if active[1] else None, self.aux2(x) if active[2] else None


@pytest.mark.parametrize("active", [(True, True, True), (True, False, True)])
def test_accumulated_micro_batches_step_like_their_union(active):
    torch.manual_seed(0)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    cfg = TrainConfig(method="dhm", lr=0.1, momentum=0.9, weight_decay=1e-3, reference_loss=True)
    params = []
    for batches in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])]):
        torch.manual_seed(1)
        model = ThreeHeads().double()
        parts = step_parts(cfg, model, build_optimizer(model, cfg, torch.device("cpu")), None,
                           contextlib.nullcontext, BranchSampler(3))
        results = engine.train_step(parts, batches, active, alpha=0.7, temperature=2.0)
        assert [n for _, _, n in results] == [len(b[1]) for b in batches]
        assert all(not loss.requires_grad for loss, _, _ in results)
        params.append([p.detach().clone() for p in model.parameters()])
    for whole, accumulated in zip(*params, strict=True):
        torch.testing.assert_close(accumulated, whole, rtol=1e-10, atol=1e-12)
    torch.manual_seed(1)
    initial = ThreeHeads().double().parameters()
    moved = [not torch.equal(p, p0) for p, p0 in zip(params[0], initial, strict=True)]
    assert moved == [True] * 4 + [active[1]] * 2 + [active[2]] * 2  # trunk, main, then each branch if active
