"""The training loop, read top to bottom: one epoch of training, one pass of evaluation.

The trainer never branches on the method: the model returns its heads, `dhm_loss` turns them into
one loss. Metrics stay on the device; the host syncs once per log interval, never per step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dhm_fast.losses import dhm_loss
from dhm_fast.metrics import EvalMeter, TrainMeter
from dhm_fast.sampling import BranchSampler
from dhm_fast.schedules import LRSchedule, Ramp


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
    loss_kwargs: dict  # method, direction, eps, label_smoothing, ce_weights, reference


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
) -> bool:
    """Train until the loader's epoch ends (True) or `max_steps` is reached (False).

    One optimizer step consumes `grad_accum` consecutive micro-batches of the loader; each one's loss
    is scaled by 1/grad_accum, so the step sees the gradient of the mean over all of them. Under DDP
    only the last micro-batch's backward all-reduces (the others run inside `no_sync`). Progress,
    schedules and branch sampling count optimizer steps.
    """
    model, optimizer = parts.model, parts.optimizer
    model.train()
    bad_step = torch.full((), -1, dtype=torch.long, device=meter.loss_sum.device)
    t0, seen = time.perf_counter(), 0
    for micro_batches in _groups(loader, grad_accum):
        if max_steps is not None and progress.step >= max_steps:
            _raise_if_bad(bad_step)
            return False
        in_epoch = progress.step - progress.epoch * steps_per_epoch
        epoch_progress = progress.epoch + in_epoch / steps_per_epoch
        lr = parts.lr.lr(epoch_progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        active = parts.sampler.active(progress.epoch, progress.step)
        alpha, temperature = parts.alpha.at(epoch_progress), parts.temperature.at(epoch_progress)

        optimizer.zero_grad(set_to_none=True)
        for i, (images, labels) in enumerate(micro_batches):
            with _sync_grads(model, i == len(micro_batches) - 1):
                with parts.autocast():
                    outputs = model(images, active=active)
                loss, stats = dhm_loss(
                    outputs, labels, active=active, return_stats=True, alpha=alpha, temperature=temperature,
                    **parts.loss_kwargs,
                )
                scaled = loss / len(micro_batches) if len(micro_batches) > 1 else loss
                if parts.scaler is not None:
                    parts.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            # Remember the first non-finite step without a host sync; checked at log time.
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), progress.step, bad_step)
            meter.update(loss, stats, len(labels), active)
            seen += len(labels)
        if parts.scaler is not None:
            parts.scaler.step(optimizer)
            parts.scaler.update()
        else:
            optimizer.step()

        progress.step += 1
        if progress.step % log_every == 0 or progress.step % steps_per_epoch == 0:
            _raise_if_bad(bad_step)
            if on_log is not None:
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                on_log({"step": progress.step, "loss": meter.loss_sum.item() / max(meter.samples, 1),
                        "lr": lr, "img_per_s": rate})
        if checkpoint_every and on_checkpoint is not None and progress.step % checkpoint_every == 0:
            _raise_if_bad(bad_step)  # never checkpoint a diverged model
            on_checkpoint()
    _raise_if_bad(bad_step)
    return True


def _groups(loader, n: int):
    """Consecutive groups of `n` batches; a trailing incomplete group is dropped (as drop_last)."""
    group: list = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


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
