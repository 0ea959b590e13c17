"""Training throughput of baseline, DSL, DKS, DHM and sampled DHM, side by side in one process.

    python -m benchmarks.throughput --arch resnet32 --image-size 32 [--precision bf16 --channels-last --profile]

Each variant ("dhm-p0.5": DHM with branch probability 0.5) runs the trainer's own loop and step in short
timed blocks, interleaved with the other variants. How it measures and what each output means:
docs/benchmarks.md.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from benchmarks import flops as flopcount
from benchmarks import throughput_report as report
from benchmarks.common import check, cli, device_name, log, option, output_folder, parse_settings, sync
from benchmarks.flops import Pattern
from dhm_fast import distributed, precision
from dhm_fast.config import TrainConfig
from dhm_fast.engine import NonFiniteLoss, Progress, StepParts, step_parts, train_one_epoch, train_step
from dhm_fast.errors import UserError
from dhm_fast.metrics import TrainMeter
from dhm_fast.models import IMAGENET_ARCHS
from dhm_fast.models.backbones import is_backbone
from dhm_fast.optim import OPTIMIZER_IMPLS, build_optimizer
from dhm_fast.run import build_model
from dhm_fast.sampling import BranchSampler
from dhm_fast.telemetry import for_device
from pipelines import BACKENDS, Loader, LoaderConfig, create_loaders

PRECISIONS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
FULL = {"warmup": 3, "steps": 5, "repeats": 8}
QUICK = {"warmup": 1, "steps": 2, "repeats": 2}
PROFILE_STEPS = 3


class Variant(NamedTuple):
    name: str
    method: str
    branch_prob: float = 1.0


def parse_variants(text: str) -> list[Variant]:
    """"baseline,dsl,dks,dhm,dhm-p0.5" -> variants; the baseline is added first when missing."""
    out: list[Variant] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        m = re.fullmatch(r"(baseline|dsl|dks|dhm)(?:-p([0-9.]+))?", item)
        if m is None:
            raise ValueError(f"unknown variant {item!r}; use baseline, dsl, dks, dhm or dhm-pP (0 <= P <= 1)")
        if m.group(2) and (m.group(1) != "dhm" or not 0.0 <= float(m.group(2)) <= 1.0):
            raise ValueError(f"variant {item!r}: only dhm takes a branch probability, in [0, 1]")
        out.append(Variant(item, m.group(1), float(m.group(2) or 1.0)))
    if len({v.name for v in out}) != len(out):
        raise ValueError(f"--methods lists a variant twice: {text!r}")
    return out if any(v.method == "baseline" for v in out) else [Variant("baseline", "baseline"), *out]


@dataclass
class BenchConfig:
    arch: str = option("resnet32", "network (any name dhm_fast.models.create_model builds)")
    image_size: int = option(32, ge=1)
    batch_size: int | None = option(None, "per device (default 128 on CUDA, 32 on CPU)", ge=1)
    num_classes: int | None = option(None, "default 1000 (ImageNet archs, tv:/timm: backbones) or 100", ge=1)
    in_channels: int = option(3, ge=1)
    methods: str = option("baseline,dsl,dks,dhm,dhm-p0.5", "variants: baseline, dsl, dks, dhm, dhm-pP (DHM with "
                          "branch probability P); the baseline is always added")
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    precision: str = option("fp32", "autocast dtype (fp16 adds a GradScaler)", tuple(PRECISIONS))
    channels_last: bool = option(False)
    compile: bool = option(False, "torch.compile each model (compiled in warm-up)")
    loader: str = option("synthetic", "synthetic: random batches on the device (model only); any other: that "
                         "real data backend (end to end)", BACKENDS)
    dataset: str = option("imagenet", "for a real loader")
    data_dir: str | None = option(None, "for a real loader")
    num_workers: int = option(2, ge=0)
    warmup: int | None = option(None, f"untimed steps per variant, +1 per branch pattern when sampling "
                                f"({FULL['warmup']})", ge=0)
    steps: int | None = option(None, f"timed steps per block ({FULL['steps']})", ge=1)
    repeats: int | None = option(None, f"blocks per variant, interleaved across variants ({FULL['repeats']})", ge=1)
    threads: int | None = option(None, "torch CPU threads", ge=1)
    reference_loss: bool = option(False, "use the plain-PyTorch loss, not the fused op")
    optimizer_impl: str = option("fused", "torch's SGD kernels (the trainer uses fused)", OPTIMIZER_IMPLS)
    profile: bool = option(False, f"write a torch.profiler Chrome trace of {PROFILE_STEPS} steps per variant")
    out: str = option("bench_out/throughput")
    seed: int = option(0)
    quick: bool = option(False, "a smoke test: 1 warm-up step, 2 repeats x 2 steps (explicit flags still win)")

    def resolve(self, device: torch.device) -> None:
        """The defaults that depend on --quick, the device and the network; then every value checked."""
        defaults = {**(QUICK if self.quick else FULL), "batch_size": 128 if device.type == "cuda" else 32,
                    "num_classes": 1000 if self.arch in IMAGENET_ARCHS or is_backbone(self.arch) else 100}
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        check(self)


# --- data -----------------------------------------------------------------------------------------


def endless(cfg: BenchConfig, device: torch.device) -> tuple[Loader, Iterator[tuple[Tensor, Tensor]]]:
    """The training loader (synthetic batches made on the device, or the real backend --loader names) and
    its batches, epoch after epoch; a loader that stays on the host is copied to the device here, inside
    the timed step."""
    train, val = create_loaders(LoaderConfig(
        backend=cfg.loader, dataset=cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size,
        device=str(device), channels_last=cfg.channels_last, seed=cfg.seed, num_workers=cfg.num_workers,
        image_size=cfg.image_size, synthetic_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
        synthetic_classes=cfg.num_classes, synthetic_batches=4))
    val.close()

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for epoch in itertools.count():
            train.set_epoch(epoch)
            for images, labels in train:
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return train, batches()


def timed(batches: Iterator, n: int, stamps: list[float], device: torch.device) -> Iterator:
    """Yield n batches, stamping the clock (after a device sync) before each one and after the last: the
    engine runs one whole step between two yields, so two stamps bracket one step, data loading included."""
    for _ in range(n):
        sync(device)
        stamps.append(time.perf_counter())
        yield next(batches)
    sync(device)
    stamps.append(time.perf_counter())


# --- one variant's training pieces -----------------------------------------------------------------


@dataclass
class Bench:
    variant: Variant
    model: nn.Module  # the bare model (FLOPs, probes)
    parts: StepParts  # what the engine steps (its model may be compiled)
    progress: Progress
    meter: TrainMeter
    step_times: list[list[float]] = field(default_factory=list)  # [repeat][step] seconds
    block_patterns: list[list[Pattern]] = field(default_factory=list)
    loss_times: list[list[float]] = field(default_factory=list)
    peak_bytes: int | None = None
    flops_by_pattern: dict[Pattern, tuple[int, int]] = field(default_factory=dict)  # (fwd, step) / image
    saved_by_pattern: dict[Pattern, int] = field(default_factory=dict)  # activation bytes / image
    probes: dict[Pattern, list[Tensor | None]] = field(default_factory=dict)
    probe_labels: Tensor | None = None
    nonfinite: str | None = None

    @property
    def patterns(self) -> list[Pattern]:
        """The branch patterns this variant can draw."""
        heads = self.model.num_heads
        return [(True,) * heads] if self.parts.sampler.always_all else flopcount.patterns(heads)

    def step(self, batch: tuple[Tensor, Tensor], active: Pattern, mark=None) -> None:
        """One trainer step on a chosen branch pattern, for warm-up and profiling (phases labelled by `mark`)."""
        train_step(self.parts, [batch], active, self.parts.alpha.at(0.0), self.parts.temperature.at(0.0), mark)


def build_bench(variant: Variant, cfg: BenchConfig, loader: Loader, device: torch.device, autocast,
                needs_scaler: bool) -> Bench:
    torch.manual_seed(cfg.seed)  # every variant starts from the same trunk weights
    # A small learning rate: the weights' values do not change the cost, and random labels at
    # lr 0.1 could drive a long benchmark to NaN (which would also slow some CPUs down).
    train_cfg = TrainConfig(arch=cfg.arch, method=variant.method, lr=0.01, branch_prob=variant.branch_prob,
                            reference_loss=cfg.reference_loss, seed=cfg.seed, channels_last=cfg.channels_last)
    model = build_model(train_cfg, loader.num_classes, loader.in_channels, device)
    optimizer = build_optimizer(model, train_cfg, device, impl=cfg.optimizer_impl)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
    sampler = BranchSampler(model.num_heads, variant.branch_prob, "step", cfg.seed)
    parts = step_parts(train_cfg, torch.compile(model) if cfg.compile else model, optimizer, scaler, autocast,
                       sampler)
    return Bench(variant, model, parts, Progress(), TrainMeter(model.num_heads, device))


def prepare(bench: Bench, batches: Iterator, warmup: int, autocast, device: torch.device) -> None:
    """For every pattern the variant can draw: FLOPs and saved-activation bytes per image (counted on two
    images) and the logits of one whole batch, kept to time the loss alone. Then untimed steps (allocator,
    cuDNN autotuning, torch.compile) and, when sampling, every branch pattern once."""
    images, labels = next(batches)
    for pat in bench.patterns:
        fwd, step, saved = flopcount.step_costs(bench.model, images[:2], labels[:2], pat, bench.parts.loss, autocast)
        bench.flops_by_pattern[pat], bench.saved_by_pattern[pat] = (fwd, step), saved
        with torch.no_grad(), autocast():
            bench.probes[pat] = list(bench.model(images, active=pat))
    bench.probe_labels = labels
    for _ in range(warmup):
        bench.step(next(batches), bench.parts.sampler.active(0, 0))
    for pattern in bench.patterns if len(bench.patterns) > 1 else []:
        bench.step(next(batches), pattern)
    sync(device)


def run_block(bench: Bench, batches: Iterator, steps: int, device: torch.device) -> None:
    """`steps` trainer steps, each timed (and the patterns drawn remembered)."""
    stamps: list[float] = []
    first = bench.progress.step
    try:
        train_one_epoch(bench.parts, timed(batches, steps, stamps, device), bench.progress, bench.meter,
                        steps_per_epoch=10**12, log_every=10**12)
    except NonFiniteLoss as err:  # raised after the block's steps: their times still count
        bench.nonfinite = str(err)
    bench.step_times.append([b - a for a, b in itertools.pairwise(stamps)])
    bench.block_patterns.append([bench.parts.sampler.active(0, s) for s in range(first, bench.progress.step)])


def time_loss(bench: Bench, iters: int, device: torch.device) -> None:
    """`iters` timings of the step's loss forward + its backward (to the logits) on the kept logits of
    the patterns the last block drew."""
    patterns = bench.block_patterns[-1] or bench.patterns[:1]
    times = []
    for i in range(iters):
        pat = patterns[i % len(patterns)]
        leaves = [x.clone().requires_grad_() if x is not None else None for x in bench.probes[pat]]
        sync(device)
        t0 = time.perf_counter()
        bench.parts.loss.compute(leaves, bench.probe_labels, active=pat)[0].backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    bench.loss_times.append(times)


def resident_bytes(bench: Bench) -> int:
    """Bytes the variant keeps between steps: parameters, their gradients, optimizer state."""
    params = list(bench.model.parameters())
    state = [t for s in bench.parts.optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in params + [p.grad for p in params if p.grad is not None] + state)


# --- the run ---------------------------------------------------------------------------------------


def set_threads(threads: int | None, device: torch.device) -> None:
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1):
        # Measured here: on a saturated 2-core machine, 2 OpenMP threads made steps 5-100x slower
        # and erratic (threads wait at barriers for descheduled siblings); 1 thread was stable.
        log(f"warning: the CPU is busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); "
            "--threads 1 gives steadier figures")


def run(cfg: BenchConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Benchmark every variant; returns the JSON-ready result (also written to cfg.out). `argv` is
    recorded as the command (None: this process's own)."""
    device = distributed.process_device(cfg.device, distributed.World())
    cfg.resolve(device)
    variants = parse_variants(cfg.methods)
    set_threads(cfg.threads, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:  # the trainer's choices: autocast dtype, GradScaler for fp16, TF32 on CUDA
        speed = precision.choose(PRECISIONS[cfg.precision], cfg.channels_last, device, deterministic=False)
    except UserError as err:
        raise ValueError(str(err).replace("--amp", "--precision")) from None
    precision.apply(speed)
    autocast = precision.autocast_factory(speed, device)
    out = output_folder(cfg.out)

    loader, batches = endless(cfg, device)
    images, _ = next(batches)
    # A real loader decides the resolution, classes and channels.
    cfg.image_size, cfg.num_classes, cfg.in_channels = int(images.shape[-1]), loader.num_classes, loader.in_channels
    benches = [build_bench(v, cfg, loader, device, autocast, speed.needs_scaler) for v in variants]
    backend = benches[0].parts.loss.backend(device)
    loss_backend = f"{backend.name} ({backend.reason})"
    log(f"{cfg.arch} at {tuple(images.shape[1:])}, batch {cfg.batch_size}, {cfg.precision}, "
        f"{'channels_last' if cfg.channels_last else 'NCHW'}, compile {'on' if cfg.compile else 'off'}, "
        f"{device} ({device_name(device)}), data: {loader.name}, loss: {loss_backend}")
    for b in benches:
        log(f"warm-up and FLOP count: {b.variant.name}")
        prepare(b, batches, cfg.warmup, autocast, device)

    telemetry = for_device(device)
    if not telemetry.start():
        log(f"GPU telemetry: {telemetry.reason}")
    try:
        for r in range(cfg.repeats):
            shift = r % len(benches)
            for b in benches[shift:] + benches[:shift]:  # rotate: no variant always runs first
                telemetry.set_label(b.variant.name)
                if device.type == "cuda":
                    sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device) - resident_bytes(b)
                run_block(b, batches, cfg.steps, device)
                if device.type == "cuda":
                    b.peak_bytes = max(b.peak_bytes or 0, torch.cuda.max_memory_allocated(device) - base)
                telemetry.set_label(None)
                time_loss(b, cfg.steps, device)
            log(f"repeat {r + 1}/{cfg.repeats}: " + ", ".join(
                f"{b.variant.name} {cfg.batch_size * len(b.step_times[-1]) / sum(b.step_times[-1]):.1f}"
                for b in benches) + " img/s")
    finally:
        telemetry.stop()

    traces = profile_all(benches, batches, device, out) if cfg.profile else []
    loader.close()
    result = report.summarise(benches, cfg, device, telemetry, traces, loader.name, loss_backend, argv)
    (out / "throughput.json").write_text(json.dumps(result, indent=2))
    print(report.format_table(result))
    report.plot(result, out / "throughput.png")
    log(f"wrote {out / 'throughput.json'} and {out / 'throughput.png'}")
    return result


def profile_all(benches: list[Bench], batches: Iterator, device: torch.device, out: Path) -> list[str]:
    """A torch.profiler Chrome trace and op table of PROFILE_STEPS steps per variant (labels: forward/loss/...)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    paths = []
    for b in benches:
        with profile(activities=activities, record_shapes=True) as prof:
            for i in range(PROFILE_STEPS):
                with record_function("train_step"):
                    b.step(next(batches), b.parts.sampler.active(0, b.progress.step + i), record_function)
            sync(device)
        paths.append(str(out / f"trace_{b.variant.name}.json"))
        prof.export_chrome_trace(paths[-1])
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        (out / f"profile_{b.variant.name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
        log(f"profile: {paths[-1]}")
    return paths


def main(argv: list[str] | None = None) -> int:
    cfg = parse_settings(BenchConfig, "benchmarks.throughput", __doc__, argv)
    return cli(lambda: run(cfg, argv))


if __name__ == "__main__":
    sys.exit(main())
