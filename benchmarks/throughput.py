"""Training throughput of baseline, DSL, DKS, DHM and sampled DHM, side by side in one process.

    python -m benchmarks.throughput --arch resnet32 --image-size 32
    python -m benchmarks.throughput --arch resnet50 --image-size 224 --batch-size 256 \\
        --precision bf16 --channels-last --compile --profile

For each method ("variant") a model and optimizer are built the trainer's way, warmed up, and then
timed in short blocks of steps, the variants interleaved block by block and their order rotated
every repeat, so that drift on a shared machine hits every variant alike. Each timed step is the
trainer's own loop and step (`dhm_fast.engine.train_one_epoch` and `train_step`: forward under
autocast, loss, backward, optimizer step, on-device metrics); the step's loss call with its backward
is timed apart on the same logits. Ratios to the baseline are taken within a repeat, then summarised over repeats.

Outputs in --out (written by `benchmarks.throughput_report`): throughput.json (every figure),
throughput.png (images/s per variant, measured beside FLOP-predicted), and with --profile a Chrome
trace per variant (open in ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import flops as flopcount
from benchmarks import throughput_report as report
from benchmarks.common import device_name, log, max_rss_bytes, sync
from dhm_fast import distributed, precision
from dhm_fast.config import TrainConfig
from dhm_fast.engine import NonFiniteLoss, Progress, StepParts, step_parts, train_one_epoch, train_step
from dhm_fast.errors import UserError
from dhm_fast.losses import LossConfig, select_backend
from dhm_fast.metrics import TrainMeter
from dhm_fast.models import IMAGENET_ARCHS, MODEL_NAMES, create_model
from dhm_fast.optim import OPTIMIZER_IMPLS, build_optimizer
from dhm_fast.sampling import BranchSampler
from dhm_fast.telemetry import for_device

PRECISIONS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
DEFAULT_VARIANTS = "baseline,dsl,dks,dhm,dhm-p0.5"
LOADERS = ("synthetic", "memory", "torchvision", "dali", "ffcv", "auto")
Pattern = tuple[bool, ...]
FULL = {"warmup": 3, "steps": 5, "repeats": 8}
QUICK = {"warmup": 1, "steps": 2, "repeats": 2}


# --- variants -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A method as benchmarked: `dhm-p0.5` is DHM with each branch on with probability 0.5."""

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
        prob = float(m.group(2)) if m.group(2) else 1.0
        if not 0.0 <= prob <= 1.0 or (m.group(2) and m.group(1) != "dhm"):
            raise ValueError(f"variant {item!r}: only dhm takes a branch probability, in [0, 1]")
        out.append(Variant(item, m.group(1), prob))
    if len({v.name for v in out}) != len(out):
        raise ValueError(f"--methods lists a variant twice: {text!r}")
    if not any(v.method == "baseline" for v in out):
        out.insert(0, Variant("baseline", "baseline"))
    return out


# --- settings -------------------------------------------------------------------------------------


def option(default: Any, help: str = "", choices: tuple | None = None) -> Any:
    """A setting with its command-line help: the flags are generated from BenchConfig's fields."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class BenchConfig:
    arch: str = option("resnet32", "network", MODEL_NAMES)
    image_size: int = option(32)
    batch_size: int | None = option(None, "per device (default 128 on CUDA, 32 on CPU)")
    num_classes: int | None = option(None, "default 1000 (ImageNet archs) or 100")
    in_channels: int = option(3)
    methods: str = option(DEFAULT_VARIANTS, "variants: baseline, dsl, dks, dhm, dhm-pP (DHM with branch "
                          "probability P); the baseline is always added")
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    precision: str = option("fp32", "autocast dtype (fp16 adds a GradScaler)", tuple(PRECISIONS))
    channels_last: bool = option(False)
    compile: bool = option(False, "torch.compile each model (compiled in warm-up)")
    loader: str = option("synthetic", "synthetic: random batches on the device (model only); any other: that "
                         "real data backend (end to end)", LOADERS)
    dataset: str = option("imagenet", "for a real loader")
    data_dir: str | None = option(None, "for a real loader")
    num_workers: int = option(2)
    warmup: int | None = option(None, f"untimed steps per variant, +1 per branch pattern when sampling "
                                f"({FULL['warmup']})")
    steps: int | None = option(None, f"timed steps per block ({FULL['steps']})")
    repeats: int | None = option(None, f"blocks per variant, interleaved across variants ({FULL['repeats']})")
    loss_iters: int | None = option(None, "isolated loss timings per block (default: --steps)")
    threads: int | None = option(None, "torch CPU threads")
    reference_loss: bool = option(False, "use the plain-PyTorch loss, not the fused op")
    optimizer_impl: str = option("fused", "torch's SGD kernels (the trainer uses fused)", OPTIMIZER_IMPLS)
    profile: bool = option(False, "write a torch.profiler Chrome trace per variant")
    profile_steps: int = option(3)
    out: str = option("bench_out/throughput")
    seed: int = option(0)
    quick: bool = option(False, "a smoke test: 1 warm-up step, 2 repeats x 2 steps (explicit flags still win)")

    def resolve(self, device: torch.device) -> None:
        defaults = QUICK if self.quick else FULL
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.quick:
            self.profile_steps = min(self.profile_steps, 2)
        if self.batch_size is None:
            self.batch_size = 128 if device.type == "cuda" else 32
        if self.num_classes is None:
            self.num_classes = 1000 if self.arch in IMAGENET_ARCHS else 100
        if self.loss_iters is None:
            self.loss_iters = self.steps
        checks = {"batch-size": self.batch_size, "image-size": self.image_size, "steps": self.steps,
                  "repeats": self.repeats, "num-classes": self.num_classes, "loss-iters": self.loss_iters}
        for name, value in checks.items():
            if value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        for f in dataclasses.fields(self):  # choices, for a config built without the command line
            if f.metadata["choices"] and getattr(self, f.name) not in f.metadata["choices"]:
                raise ValueError(f"unknown {f.name} {getattr(self, f.name)!r}; choose one of "
                                 f"{', '.join(f.metadata['choices'])}")


# --- data -----------------------------------------------------------------------------------------


class BatchSource:
    """An endless stream of (images, labels): device-resident synthetic batches or a real loader."""

    def __init__(self, cfg: BenchConfig, device: torch.device) -> None:
        from pipelines import LoaderConfig, create_loaders

        assert cfg.batch_size is not None and cfg.num_classes is not None
        common = dict(batch_size=cfg.batch_size, device=str(device), channels_last=cfg.channels_last,
                      seed=cfg.seed, num_workers=cfg.num_workers, image_size=cfg.image_size)
        if cfg.loader == "synthetic":
            shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
            lc = LoaderConfig(backend="synthetic", synthetic_shape=shape, synthetic_classes=cfg.num_classes,
                              synthetic_batches=4, **common)
        else:
            lc = LoaderConfig(backend=cfg.loader, dataset=cfg.dataset, data_dir=cfg.data_dir, **common)
        self.loader, val = create_loaders(lc)
        val.close()
        self.name = self.loader.name
        self.num_classes = self.loader.num_classes
        self.in_channels = self.loader.in_channels
        self.device = device
        self.epoch = 0
        self._it: Iterator | None = None

    def next(self) -> tuple[Tensor, Tensor]:
        while True:
            if self._it is None:
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                images, labels = next(self._it)
            except StopIteration:
                self._it, self.epoch = None, self.epoch + 1
                continue
            # A loader that stays on the host (e.g. torchvision) is copied here, inside the timed step.
            return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def close(self) -> None:
        self.loader.close()


def timed_batches(source: BatchSource, n: int, stamps: list[float], device: torch.device) -> Iterator:
    """Yield n batches, stamping the clock (after a device sync) before each one and after the last.

    The engine runs one whole step between two of our yields, so consecutive stamps bracket
    exactly one step, data loading included; no hook into the engine is needed.
    """
    for _ in range(n):
        sync(device)
        stamps.append(time.perf_counter())
        yield source.next()
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


def build_bench(variant: Variant, cfg: BenchConfig, source: BatchSource, device: torch.device, autocast,
                needs_scaler: bool) -> Bench:
    torch.manual_seed(cfg.seed)  # every variant starts from the same trunk weights
    model = create_model(cfg.arch, source.num_classes, method=variant.method, in_channels=source.in_channels)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # A small learning rate: the weights' values do not change the cost, and random labels at
    # lr 0.1 could drive a long benchmark to NaN (which would also slow some CPUs down).
    train_cfg = TrainConfig(arch=cfg.arch, method=variant.method, lr=0.01, branch_prob=variant.branch_prob,
                            reference_loss=cfg.reference_loss, seed=cfg.seed)
    optimizer = build_optimizer(model, train_cfg, device, impl=cfg.optimizer_impl)
    net = torch.compile(model) if cfg.compile else model
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
    sampler = BranchSampler(model.num_heads, variant.branch_prob, "step", cfg.seed)
    parts = step_parts(train_cfg, net, optimizer, scaler, autocast, sampler)
    return Bench(variant, model, parts, Progress(), TrainMeter(model.num_heads, device))


def run_block(bench: Bench, source: BatchSource, steps: int, device: torch.device) -> list[float]:
    """`steps` trainer steps; returns each step's seconds (and remembers the patterns drawn)."""
    stamps: list[float] = []
    first = bench.progress.step
    try:
        batches = timed_batches(source, steps, stamps, device)
        train_one_epoch(bench.parts, batches, bench.progress, bench.meter, steps_per_epoch=10**12,
                        log_every=10**12)
    except NonFiniteLoss as err:  # raised after the block's steps: their times still count
        bench.nonfinite = str(err)
    drawn = [bench.parts.sampler.active(0, s) for s in range(first, bench.progress.step)]
    bench.block_patterns.append(drawn)
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def warm_up(bench: Bench, source: BatchSource, cfg: BenchConfig, device: torch.device) -> None:
    """Untimed steps: allocator, cuDNN autotuning, torch.compile, and every branch pattern once."""
    for _ in range(cfg.warmup):
        step_once(bench, source.next(), bench.parts.sampler.active(0, 0))
    for pattern in bench.patterns if len(bench.patterns) > 1 else []:
        step_once(bench, source.next(), pattern)
    sync(device)


def step_once(bench: Bench, batch: tuple[Tensor, Tensor], active: Pattern, mark=None) -> None:
    """One trainer step on a chosen branch pattern, for warm-up and profiling (phases labelled by `mark`)."""
    p = bench.parts
    train_step(p, [batch], active, p.alpha.at(0.0), p.temperature.at(0.0), mark)


# --- loss timing, FLOPs, memory --------------------------------------------------------------------


def make_probes(bench: Bench, source: BatchSource) -> None:
    """Logits of one forward per pattern, kept to time the loss alone on realistic inputs."""
    images, labels = source.next()
    with torch.no_grad(), bench.parts.autocast():
        for pat in bench.patterns:
            outs = bench.model(images, active=pat)
            bench.probes[pat] = [o.detach().clone() if o is not None else None for o in outs]
    bench.probe_labels = labels


def time_loss(bench: Bench, patterns: list[Pattern], iters: int, device: torch.device) -> list[float]:
    """Seconds of the step's loss forward + its backward (to the logits) for `iters` draws of `patterns`."""
    out = []
    for i in range(iters):
        pat = patterns[i % len(patterns)]
        leaves = [x.clone().requires_grad_() if x is not None else None for x in bench.probes[pat]]
        sync(device)
        t0 = time.perf_counter()
        loss, _ = bench.parts.loss.compute(leaves, bench.probe_labels, active=pat)
        loss.backward()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def count_bench(bench: Bench, source: BatchSource, autocast) -> None:
    """FLOPs and saved-activation bytes per image for every pattern this variant can draw."""
    images, labels = source.next()
    images, labels = images[:2], labels[:2]
    loss = bench.parts.loss
    for pat in bench.patterns:
        bench.flops_by_pattern[pat] = flopcount.step_flops(bench.model, images, labels, pat, loss, autocast)
        bench.saved_by_pattern[pat] = saved_activation_bytes(bench.model, images, labels, pat, loss,
                                                             autocast) // images.shape[0]


def saved_activation_bytes(model: nn.Module, images: Tensor, labels: Tensor, active: Pattern,
                           loss: LossConfig, autocast) -> int:
    """Bytes autograd keeps for backward in one step, parameters excluded (unique storages).

    Device-independent, so it stands in for peak memory where the CPU has no allocator counter.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        outputs = model(images, active=active)
        value, _ = loss.compute(outputs, labels, active=active)
    del outputs, value
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def resident_bytes(bench: Bench) -> int:
    """Bytes the variant keeps between steps: parameters, their gradients, optimizer state."""
    total = 0
    for p in bench.model.parameters():
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
    for state in bench.parts.optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, Tensor))
    return total


# --- the run ---------------------------------------------------------------------------------------


def run(cfg: BenchConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Benchmark every variant; returns the JSON-ready result (also written to cfg.out). `argv` is
    recorded as the command (None: this process's own)."""
    device = distributed.process_device(cfg.device, distributed.World())
    cfg.resolve(device)
    variants = parse_variants(cfg.methods)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1):
        # Measured here: on a saturated 2-core machine, 2 OpenMP threads made steps 5-100x slower
        # and erratic (threads wait at barriers for descheduled siblings); 1 thread was stable.
        log(f"warning: the CPU is busy (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); "
            "--threads 1 gives steadier figures")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:  # the trainer's choices: autocast dtype, GradScaler for fp16, TF32 on CUDA
        speed = precision.choose(PRECISIONS[cfg.precision], cfg.channels_last, device, deterministic=False)
    except UserError as err:
        raise ValueError(str(err).replace("--amp", "--precision")) from None
    precision.apply(speed)
    autocast, needs_scaler = precision.autocast_factory(speed, device), speed.needs_scaler
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rss0 = max_rss_bytes()

    source = BatchSource(cfg, device)
    images, _ = source.next()
    # A real loader decides the resolution, classes and channels.
    cfg.image_size = int(images.shape[-1])
    cfg.num_classes, cfg.in_channels = source.num_classes, source.in_channels
    log(f"{cfg.arch} at {tuple(images.shape[1:])}, batch {cfg.batch_size}, {cfg.precision}, "
        f"{'channels_last' if cfg.channels_last else 'NCHW'}, compile {'on' if cfg.compile else 'off'}, "
        f"{device} ({device_name(device)}), data: {source.name}, loss: {loss_backend(cfg.reference_loss, device)}")

    benches = [build_bench(v, cfg, source, device, autocast, needs_scaler) for v in variants]
    for b in benches:
        log(f"warm-up and FLOP count: {b.variant.name}")
        count_bench(b, source, autocast)
        warm_up(b, source, cfg, device)
        make_probes(b, source)

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
                b.step_times.append(run_block(b, source, cfg.steps, device))
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) - base
                    b.peak_bytes = max(b.peak_bytes or 0, peak)
                telemetry.set_label(None)
                b.loss_times.append(time_loss(b, b.block_patterns[-1] or [(True,) * b.model.num_heads],
                                              cfg.loss_iters, device))
            log(f"repeat {r + 1}/{cfg.repeats}: " + ", ".join(
                f"{b.variant.name} {cfg.batch_size * len(b.step_times[-1]) / sum(b.step_times[-1]):.1f}"
                for b in benches) + " img/s")
    finally:
        telemetry.stop()

    traces = profile_all(benches, source, cfg, device, out) if cfg.profile else []
    source.close()
    result = report.summarise(benches, cfg, device, telemetry, traces, source.name,
                              loss_backend(cfg.reference_loss, device), argv)
    if device.type == "cpu":
        result["memory"]["process_rss_growth_bytes"] = max(max_rss_bytes() - rss0, 0)
    (out / "throughput.json").write_text(json.dumps(result, indent=2))
    print(report.format_table(result))
    report.plot(result, out / "throughput.png")
    log(f"wrote {out / 'throughput.json'} and {out / 'throughput.png'}")
    return result


def profile_all(benches: list[Bench], source: BatchSource, cfg: BenchConfig, device: torch.device,
                out: Path) -> list[str]:
    """A torch.profiler Chrome trace of `profile_steps` steps per variant (labels: forward/loss/...)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    paths = []
    for b in benches:
        with profile(activities=activities, record_shapes=True) as prof:
            for i in range(cfg.profile_steps):
                with record_function("train_step"):
                    active = b.parts.sampler.active(0, b.progress.step + i)
                    step_once(b, source.next(), active, record_function)
            sync(device)
        path = out / f"trace_{b.variant.name}.json"
        prof.export_chrome_trace(str(path))
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        (out / f"profile_{b.variant.name}.txt").write_text(table)
        paths.append(str(path))
        log(f"profile: {path}")
    return paths


def loss_backend(reference: bool, device: torch.device) -> str:
    backend = select_backend(device, reference=reference)
    return f"{backend.name} ({backend.reason})"


# --- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(BenchConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=meta["help"])
        else:
            kind = int if f.type.startswith("int") else str
            p.add_argument(flag, type=kind, default=f.default, choices=meta["choices"], help=meta["help"],
                           metavar=f.name.upper() if f.name == "arch" else None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = BenchConfig(**vars(args))
    try:
        run(cfg, argv)
    except (ValueError, FileNotFoundError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
