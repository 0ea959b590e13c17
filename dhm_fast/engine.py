"""The training loop, read top to bottom: one epoch of training, one pass of evaluation.

The trainer never branches on the method: the model returns its heads, the run's `LossConfig` turns them into
one loss. Metrics stay on the device; the host syncs once per log interval, never per step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dhm_fast.config import TrainConfig
from dhm_fast.losses import LossConfig, LossStats
from dhm_fast.metrics import EvalMeter, TrainMeter
from dhm_fast.sampling import BranchSampler
from dhm_fast.schedules import LRSchedule, Ramp, ramp_epochs


class NonFiniteLoss(Exception):
    def __init__(self, step: int) -> None:
        super().__init__(f"the loss became non-finite at step {step}")
        self.step = step


@dataclass
class Progress:
    """Where training stands; everything else (lr, alpha, active heads) is a function of it."""

    epoch: int = 0  # epoch in progress (0-based)
    step: int = 0  # optimizer steps done since the start of training
    best_top1: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)  # one record per finished epoch


@dataclass
class StepParts:
    """What one optimisation step needs besides the batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    lr: LRSchedule
    alpha: Ramp
    temperature: Ramp
    sampler: BranchSampler
    loss: LossConfig


def step_parts(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, autocast: Callable[[], contextlib.AbstractContextManager],
               sampler: BranchSampler) -> StepParts:
    """The step's schedules and loss from the training settings; `model` is what the step runs (it
    may be compiled or DDP-wrapped). The trainer and the throughput benchmark both build it here."""
    return StepParts(
        model=model, optimizer=optimizer, scaler=scaler, autocast=autocast,
        lr=LRSchedule(cfg.lr, cfg.lr_schedule, tuple(cfg.milestones), cfg.gamma, cfg.warmup_epochs, cfg.epochs),
        alpha=Ramp(cfg.alpha, cfg.alpha_ramp, ramp_epochs(cfg.alpha_ramp_epochs, cfg.epochs)),
        temperature=Ramp(cfg.temperature, cfg.temperature_ramp, ramp_epochs(cfg.temperature_ramp_epochs, cfg.epochs),
                         cfg.temperature_start),
        sampler=sampler,
        loss=LossConfig(method=cfg.method, direction=cfg.direction, eps=cfg.eps,
                        ce_weights=(1.0,) + (cfg.aux_weight,) * (sampler.num_heads - 1),
                        label_smoothing=cfg.label_smoothing, reference=cfg.reference_loss),
    )


def train_one_epoch(
    parts: StepParts,
    loader,
    progress: Progress,
    meter: TrainMeter,
    *,
    steps_per_epoch: int,
    max_steps: int | None = None,
    log_every: int = 50,
    on_log: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[], None] | None = None,
    grad_accum: int = 1,
    should_stop: Callable[[bool], bool] | None = None,
) -> bool:
    """Train until the loader's epoch ends (True), `max_steps` is reached or `should_stop` says so (False).

    One optimizer step (`train_step`) consumes `grad_accum` consecutive micro-batches of the loader.
    Progress, schedules and branch sampling count optimizer steps. `should_stop(synced)` is asked after
    every step but an epoch's last (whose evaluation and checkpoint follow anyway); `synced` tells it that
    the processes have just synchronised (a log record or a checkpoint), where they can agree on stopping.
    """
    parts.model.train()
    bad_step = torch.full((), -1, dtype=torch.long, device=meter.loss_sum.device)
    t0, seen = time.perf_counter(), 0
    # zip over one iterator n times: groups of n consecutive batches, a trailing incomplete one dropped.
    for micro_batches in zip(*[iter(loader)] * grad_accum, strict=False):
        if max_steps is not None and progress.step >= max_steps:
            _raise_if_bad(bad_step)
            return False
        in_epoch = progress.step - progress.epoch * steps_per_epoch
        epoch_progress = progress.epoch + in_epoch / steps_per_epoch
        lr = parts.lr.lr(epoch_progress)
        for group in parts.optimizer.param_groups:
            group["lr"] = lr
        active = parts.sampler.active(progress.epoch, progress.step)
        alpha, temperature = parts.alpha.at(epoch_progress), parts.temperature.at(epoch_progress)
        for loss, stats, batch in train_step(parts, micro_batches, active, alpha, temperature):
            # Remember the first non-finite step without a host sync; checked at log time.
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), progress.step, bad_step)
            meter.update(loss, stats, batch, active)
            seen += batch
        progress.step += 1
        synced = progress.step % log_every == 0 or progress.step % steps_per_epoch == 0
        if synced:
            _raise_if_bad(bad_step)
            if on_log is not None:  # img_per_s: this process's rate since the previous record
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                on_log({"step": progress.step, "lr": lr, "img_per_s": rate})
            t0, seen = time.perf_counter(), 0
        if checkpoint_every and on_checkpoint is not None and progress.step % checkpoint_every == 0:
            _raise_if_bad(bad_step)  # never checkpoint a diverged model
            on_checkpoint()
            synced = True
        if should_stop is not None and progress.step % steps_per_epoch and should_stop(synced):
            _raise_if_bad(bad_step)
            return False
    _raise_if_bad(bad_step)
    return True


def train_step(
    parts: StepParts,
    micro_batches: Sequence[tuple[Tensor, Tensor]],
    active: tuple[bool, ...],
    alpha: float,
    temperature: float,
    mark: Callable[[str], contextlib.AbstractContextManager] | None = None,
) -> list[tuple[Tensor, LossStats, int]]:
    """One optimizer step (the trainer's and the throughput benchmark's): forward under autocast, loss
    and backward for each micro-batch, each loss divided by their number (docs/distributed.md,
    "Gradient accumulation"), then the optimizer step. Returns each micro-batch's detached loss, stats
    and size without a host read. `mark(phase)` wraps each phase, e.g. with a profiler label.
    """
    mark = mark or (lambda _phase: contextlib.nullcontext())
    parts.optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    results = []
    for i, (images, labels) in enumerate(micro_batches):
        with _sync_grads(parts.model, i == n - 1):
            with mark("forward"), parts.autocast():
                outputs = parts.model(images, active=active)
            with mark("loss"):
                loss, stats = parts.loss.compute(outputs, labels, active=active, alpha=alpha, temperature=temperature)
            scaled = loss / n if n > 1 else loss
            with mark("backward"):
                (parts.scaler.scale(scaled) if parts.scaler is not None else scaled).backward()
        results.append((loss.detach(), stats, len(labels)))
    with mark("optimizer"):
        if parts.scaler is not None:
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
        else:
            parts.optimizer.step()
    return results


def _sync_grads(model: nn.Module, sync: bool):
    """DDP's no_sync() for all but the last micro-batch of a step (a plain module needs nothing)."""
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if sync or no_sync is None else no_sync()


def _raise_if_bad(bad_step: Tensor) -> None:
    step = int(bad_step.item())
    if step >= 0:
        raise NonFiniteLoss(step)


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_heads: int, autocast, device: torch.device,
             reduce: Callable[[list[Tensor]], None] | None = None, head_names=("main", "aux1", "aux2")) -> dict:
    """Per-head CE / top-1 / top-5 over the loader (every head computed, branches included)."""
    model.eval()
    meter = EvalMeter(num_heads, device)
    for images, labels in loader:
        with autocast():
            outputs = model(images, all_heads=True) if num_heads > 1 else (model(images),)
        meter.update(outputs, labels)
    if reduce is not None:
        reduce(meter.tensors())
    result = meter.summary(head_names[:num_heads])
    if not all(math.isfinite(h["ce"]) for h in result["heads"].values()):
        result["warning"] = "non-finite validation loss"
    return result
