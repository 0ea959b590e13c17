"""NCHW against channels-last for the trainer's step on this device, in fp32 and in bf16.

    python -m benchmarks.bench_layout [--arch resnet20] [--image-size 28] [--in-channels 1] [--batch-size 128]
        [--threads N] [--repeats 8] [--out bench_out]

Four variants (fp32 and bf16 autocast, each NCHW and channels-last), each the trainer's model, optimizer
and step (`dhm_fast.engine.train_step`) on a random batch in its layout, timed in interleaved blocks in one
process, so that every variant sees the same background load. Prints images/s per variant and, per
precision, channels-last's speed over NCHW; writes OUT/layout_bench.json. The rule these figures back is
`dhm_fast.precision.cpu_channels_last`; the figures are in docs/configuration.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import option
from dhm_fast import distributed, precision
from dhm_fast.config import TrainConfig
from dhm_fast.engine import step_parts, train_step
from dhm_fast.optim import build_optimizer
from dhm_fast.run import build_model
from dhm_fast.sampling import BranchSampler

AMP = {"fp32": "none", "bf16": "bf16"}


@dataclass
class LayoutBenchConfig:
    arch: str = option("resnet20", "network (the demo's by default)")
    method: str = option("dhm", choices=("baseline", "dsl", "dks", "dhm"))
    image_size: int = option(28, ge=8)
    in_channels: int = option(1, ge=1)
    num_classes: int = option(10, ge=2)
    batch_size: int = option(128, ge=1)
    precisions: str = option("fp32,bf16", "comma-separated: fp32, bf16")
    device: str = option("cpu", "cpu, cuda, cuda:N")
    warmup: int = option(3, "untimed steps per variant", ge=0)
    steps: int = option(3, "timed steps per block", ge=1)
    repeats: int = option(8, "blocks per variant, interleaved across variants", ge=1)
    threads: int | None = option(None, "torch CPU threads (default: torch's)", ge=1)
    out: Path = option(Path("bench_out"))


def variant(cfg: LayoutBenchConfig, amp: str, channels_last: bool, device: torch.device) -> Callable[[], None]:
    """One trainer step of this precision and layout, as a callable (model and batch built once)."""
    torch.manual_seed(0)  # every variant starts from the same weights
    train_cfg = TrainConfig(arch=cfg.arch, method=cfg.method, lr=0.01, channels_last=channels_last)
    speed = precision.choose(amp, channels_last, device, deterministic=False)
    autocast = precision.autocast_factory(speed, device)
    model = build_model(train_cfg, cfg.num_classes, cfg.in_channels, device)
    parts = step_parts(train_cfg, model, build_optimizer(model, train_cfg, device), None, autocast,
                       BranchSampler(model.num_heads, 1.0, "step", 0))
    images = torch.randn(cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batch = [(images, torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device))]
    active = (True,) * model.num_heads
    return lambda: train_step(parts, batch, active, parts.alpha.at(0.0), parts.temperature.at(0.0))


def measure(cfg: LayoutBenchConfig, device: torch.device) -> dict:
    names = [p.strip() for p in cfg.precisions.split(",") if p.strip()]
    unknown = sorted(set(names) - set(AMP))
    if unknown or not names:
        raise ValueError(f"--precisions: unknown {', '.join(unknown) or 'empty list'}; choose among fp32, bf16")
    steps = {f"{p} {layout}": variant(cfg, AMP[p], layout == "channels_last", device)
             for p in names for layout in ("nchw", "channels_last")}
    for name, step in steps.items():
        common.log(f"warm-up: {name}")
        for _ in range(cfg.warmup):
            step()

    def block(step: Callable[[], None]) -> Callable[[], None]:
        return lambda: [step() for _ in range(cfg.steps)]

    times = common.time_round_robin({n: block(s) for n, s in steps.items()}, device, cfg.repeats)
    per_step = {n: statistics.median(t) / cfg.steps for n, t in times.items()}
    result = {"images_per_s": {n: cfg.batch_size / s for n, s in per_step.items()},
              "step_seconds": per_step, "block_seconds": times}
    result["channels_last_speedup"] = {p: per_step[f"{p} nchw"] / per_step[f"{p} channels_last"] for p in names}
    return result


def run(args: LayoutBenchConfig, argv: list[str] | None) -> None:
    common.check(args)
    common.output_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.process_device(args.device, distributed.World())
    started = time.time()
    result = measure(args, device)
    for name, ips in result["images_per_s"].items():
        print(f"{name:22s} {ips:9.1f} images/s")
    for p, ratio in result["channels_last_speedup"].items():
        print(f"{p}: channels-last is {ratio:.2f}x NCHW's speed")
    meta = {**common.environment(device, "benchmarks.bench_layout", argv), "arch": args.arch,
            "method": args.method, "image_size": args.image_size, "in_channels": args.in_channels,
            "batch_size": args.batch_size, "threads": torch.get_num_threads(), "steps": args.steps,
            "repeats": args.repeats, "bf16_native": precision.cpu_has_bf16(), "seconds": time.time() - started}
    path = args.out / "layout_bench.json"
    path.write_text(json.dumps({"meta": meta, **result}, indent=2))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = common.parse_settings(LayoutBenchConfig, "benchmarks.bench_layout", __doc__, argv)
    return common.cli(lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
