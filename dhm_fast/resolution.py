"""Progressive resizing: the training resolution of each epoch, as a pure function of the epoch, so a
run resumed anywhere continues the ramp exactly.

The side is --res-start up to epoch --res-ramp-start, then ramps linearly to the end side (--image-size;
a small dataset's native side) at epoch --res-ramp-end, rounded to a multiple of --res-step (fast
ImageNet recipes: 160 -> 192 px in steps of 32). It changes only between epochs: the loaders take a new
side at an epoch's start, and a compiled model meets a handful of shapes (see `compile_shapes`).

With --res-batch-scale the micro-batch shrinks as the side grows, so activation memory stays at most what
--grad-accum micro-batches used at --res-start: more micro-batches are accumulated per step instead. The
global batch, the learning rate and the steps per epoch do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from dhm_fast.config import TrainConfig


@dataclass(frozen=True)
class ResolutionSchedule:
    start: int
    end: int
    ramp_start: float = 0.0  # epochs
    ramp_end: float = 0.0
    step: int = 32

    def at(self, epoch: int) -> int:
        """The training side during epoch `epoch` (0-based)."""
        if epoch <= self.ramp_start:
            return self.start
        if epoch >= self.ramp_end:
            return self.end
        t = (epoch - self.ramp_start) / (self.ramp_end - self.ramp_start)
        side = round((self.start + t * (self.end - self.start)) / self.step) * self.step
        return min(max(side, min(self.start, self.end)), max(self.start, self.end))

    def sides(self, epochs: int) -> list[int]:
        return [self.at(e) for e in range(epochs)]


def schedule_for(cfg: TrainConfig, end: int) -> ResolutionSchedule | None:
    """The run's schedule (None without --res-start); `end` is the train loader's own side."""
    if cfg.res_start is None:
        return None
    return ResolutionSchedule(cfg.res_start, end, cfg.res_ramp_start, cfg.res_ramp_end, cfg.res_step)


def apply(loader, schedule: ResolutionSchedule | None, epoch: int) -> int | None:
    """Set the loader's training side for `epoch`; returns it (None without a schedule)."""
    if schedule is None:
        return None
    side = schedule.at(epoch)
    loader.set_resolution(side)
    return side


def accumulation(per_process: int, grad_accum: int, side: int, start: int) -> int:
    """Micro-batches per step at `side`: the smallest divisor of the per-process batch that is at least
    grad_accum x (side / start)^2, so that micro-batch x side^2 does not exceed its value at `start`
    (micro-batches of one sample, when even those exceed it)."""
    need = grad_accum * (side / start) ** 2
    divisors = (d for d in range(grad_accum, per_process + 1) if per_process % d == 0 and d >= need - 1e-9)
    return next(divisors, per_process)


def apply_batch(loader, cfg: TrainConfig, side: int | None, per_process: int) -> int:
    """Set the loader's micro-batch for an epoch at `side`; returns the micro-batches per step."""
    if not cfg.res_batch_scale or side is None:
        return cfg.grad_accum
    accum = accumulation(per_process, cfg.grad_accum, side, cfg.res_start)
    loader.set_batch_size(per_process // accum)
    return accum


def compile_shapes(schedule: ResolutionSchedule | None, epochs: int, batch_scale: bool = False) -> int:
    """Graphs per branch pattern that torch.compile builds for training: one for the first side, and,
    when the side changes, one more in which Dynamo's automatic dynamic shapes make height and width
    symbolic, which then serves every later side (one more when the micro-batch also changes later)."""
    return 1 if schedule is None or len(set(schedule.sides(epochs))) == 1 else 2 + batch_scale
