"""Where an epoch of a recipe's training goes: loader, forward, loss, backward, optimizer, metrics.

    python -m benchmarks.profile_demo [--recipe fashion-mnist-resnet20] [--data-dir DIR] [--steps N] [--threads N]
        [--out bench_out]

The trainer's own set-up (`dhm_fast.run.Run`: the recipe, the device's defaults, the real data and loader,
model, optimizer, loss), then one epoch (or --steps steps) of the trainer's step with each phase timed by
the wall clock around it (`train_step`'s phase marks; no profiler, whose overhead would distort the
shares). Prints each phase's share of the epoch, and the first steps apart (warm-up); writes
OUT/demo_profile.json. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import option
from dhm_fast.config import DEFAULT_RECIPE, build_config
from dhm_fast.engine import train_step

PHASES = ("loader", "forward", "loss", "backward", "optimizer", "metrics")
WARMUP_STEPS = 10  # reported apart: allocator and oneDNN primitive caches fill here


@dataclass
class ProfileConfig:
    recipe: str = option(DEFAULT_RECIPE, "the recipe to profile (default: the demo's)")
    data_dir: str | None = option(None, "dataset folder (default: the recipe's dataset where the trainer looks)")
    steps: int | None = option(None, "steps to time (default: one epoch)", ge=1)
    threads: int | None = option(None, "torch CPU threads (default: torch's)", ge=1)
    out: Path = option(Path("bench_out"))


class PhaseClock:
    """Seconds per phase, summed; `mark(phase)` is train_step's phase hook."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def mark(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0


def profile(cfg: ProfileConfig) -> dict:
    from dhm_fast.run import Run  # the trainer's set-up, imported when used

    with tempfile.TemporaryDirectory() as out:
        run = Run(build_config(cfg.recipe, {"out": out, "device": "cpu", "data_dir": cfg.data_dir}))
        loader, parts, meter = run.train_loader, run.parts, run.meter
        steps = min(cfg.steps or len(loader), len(loader))
        warm, rest = PhaseClock(), PhaseClock()
        loader.set_epoch(0)
        batches = iter(loader)
        parts.model.train()
        started = time.perf_counter()
        for step in range(steps):
            clock = warm if step < WARMUP_STEPS else rest
            with clock.mark("loader"):
                images, labels = next(batches)
            active = parts.sampler.active(0, step)
            position = step / run.steps_per_epoch
            results = train_step(parts, [(images, labels)], active, parts.alpha.at(position),
                                 parts.temperature.at(position), clock.mark)
            with clock.mark("metrics"):
                for loss, stats, n in results:
                    meter.update(loss, stats, n, active)
        total = time.perf_counter() - started
        run.telemetry.stop()
    return {"recipe": cfg.recipe, "steps": steps, "batch_size": run.cfg.batch_size, "amp": run.cfg.amp,
            "channels_last": run.cfg.channels_last, "seconds": total,
            "warmup": {"steps": min(WARMUP_STEPS, steps), "seconds": dict(warm.seconds)},
            "after_warmup": {"steps": max(0, steps - WARMUP_STEPS), "seconds": dict(rest.seconds)}}


def run(args: ProfileConfig, argv: list[str] | None) -> None:
    common.check(args)
    common.output_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = profile(args)
    after = result["after_warmup"]["seconds"]
    timed = sum(after.values())
    n = result["after_warmup"]["steps"]
    print(f"{result['recipe']}: {result['steps']} steps, batch {result['batch_size']}, amp {result['amp']}, "
          f"channels-last {'on' if result['channels_last'] else 'off'}, {result['seconds']:.1f} s")
    warm = result["warmup"]
    print(f"first {warm['steps']} steps: {sum(warm['seconds'].values()):.2f} s")
    if n:
        print(f"after them: {n} steps, {timed:.1f} s, {n * result['batch_size'] / timed:.0f} images/s")
        for phase in PHASES:
            spent = after.get(phase, 0.0)
            print(f"  {phase:10s} {100 * spent / timed:5.1f}%  {1e3 * spent / n:7.2f} ms/step")
    meta = common.environment("cpu", "benchmarks.profile_demo", argv)
    path = args.out / "demo_profile.json"
    path.write_text(json.dumps({"meta": meta, **result}, indent=2))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = common.parse_settings(ProfileConfig, "benchmarks.profile_demo", __doc__, argv)
    return common.cli(lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
