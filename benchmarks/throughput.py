"""Training throughput of baseline, DSL, DKS, DHM and sampled DHM, side by side in one process.

    python -m benchmarks.throughput --arch resnet32 --image-size 32
    python -m benchmarks.throughput --arch resnet50 --image-size 224 --batch-size 256 \\
        --precision bf16 --channels-last --compile --profile

For each method ("variant") a model and optimizer are built the trainer's way, warmed up, and then
timed in short blocks of steps, the variants interleaved block by block and their order rotated
every repeat, so that drift on a shared machine hits every variant alike. Each timed step is the
trainer's own step (`dhm_fast.engine.train_one_epoch`: forward under autocast, `dhm_loss`,
backward, optimizer step, on-device metrics); the loss call with its backward is timed apart on
the same logits. Ratios to the baseline are taken within a repeat, then summarised over repeats.

Outputs in --out: throughput.json (every figure), throughput.png (images/s per variant, measured
beside FLOP-predicted), and with --profile a Chrome trace per variant (open in ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import flops as flopcount
from benchmarks.telemetry import FIELDS as TELEMETRY_FIELDS
from benchmarks.telemetry import GpuTelemetry, for_device
from dhm_fast import fused
from dhm_fast.config import TrainConfig
from dhm_fast.engine import NonFiniteLoss, Progress, StepParts, train_one_epoch
from dhm_fast.errors import UserError
from dhm_fast.losses import dhm_loss
from dhm_fast.metrics import TrainMeter
from dhm_fast.models import IMAGENET_ARCHS, MODEL_NAMES, create_model
from dhm_fast.optim import build_optimizer
from dhm_fast.run import make_autocast
from dhm_fast.sampling import BranchSampler
from dhm_fast.schedules import LRSchedule, Ramp

SCHEMA = "dhm_fast.throughput/1"
PRECISIONS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
DEFAULT_VARIANTS = "baseline,dsl,dks,dhm,dhm-p0.5"
LOADERS = ("synthetic", "memory", "torchvision", "dali", "ffcv", "auto")
OPTIMIZER_IMPLS = ("trainer", "fused", "foreach")
# Targets of issue 6, checked on every run and reported (never asserted).
TARGET_TIME_OVER_FLOPS = 1.10  # DHM time ratio / FLOP ratio, both against the baseline
TARGET_LOSS_SHARE = 0.02  # loss forward + backward over a DHM step
TARGET_SAMPLING_EFFICIENCY = 0.70  # time saved by branch sampling / time the skipped FLOPs predict
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


@dataclass
class BenchConfig:
    arch: str = "resnet32"
    image_size: int = 32
    batch_size: int | None = None  # None: 128 on CUDA, 32 on the CPU
    num_classes: int | None = None  # None: 1000 for ImageNet archs, 100 otherwise
    in_channels: int = 3
    methods: str = DEFAULT_VARIANTS
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    loader: str = "synthetic"
    dataset: str = "imagenet"
    data_dir: str | None = None
    num_workers: int = 2
    warmup: int | None = None  # untimed steps per variant (+1 per branch pattern when sampling); 3
    steps: int | None = None  # timed steps per block; 5
    repeats: int | None = None  # blocks per variant, interleaved across variants; 8
    # --quick: 1 warm-up step, 2 repeats x 2 steps, unless given explicitly
    loss_iters: int | None = None  # isolated loss timings per block (default: = steps)
    threads: int | None = None
    reference_loss: bool = False
    optimizer_impl: str = "trainer"  # trainer (dhm_fast.optim as is) | fused | foreach
    profile: bool = False
    profile_steps: int = 3
    out: str = "bench_out/throughput"
    seed: int = 0
    quick: bool = False

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
        if self.arch not in MODEL_NAMES:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(MODEL_NAMES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.optimizer_impl not in OPTIMIZER_IMPLS:
            raise ValueError(f"unknown optimizer implementation {self.optimizer_impl!r}; choose one of "
                             f"{', '.join(OPTIMIZER_IMPLS)}")
        if self.loader not in LOADERS:
            raise ValueError(f"unknown loader {self.loader!r}; choose one of {', '.join(LOADERS)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but no CUDA GPU is available here")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def build_bench(variant: Variant, cfg: BenchConfig, source: BatchSource, device: torch.device, autocast,
                needs_scaler: bool) -> Bench:
    torch.manual_seed(cfg.seed)  # every variant starts from the same trunk weights
    model = create_model(cfg.arch, source.num_classes, method=variant.method, in_channels=source.in_channels)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # A small learning rate: the weights' values do not change the cost, and random labels at
    # lr 0.1 could drive a long benchmark to NaN (which would also slow some CPUs down).
    train_cfg = TrainConfig(arch=cfg.arch, method=variant.method, lr=0.01, branch_prob=variant.branch_prob)
    optimizer = build_optimizer(model, train_cfg, device)
    if cfg.optimizer_impl != "trainer":
        optimizer = with_implementation(optimizer, cfg.optimizer_impl)
    net = torch.compile(model) if cfg.compile else model
    parts = StepParts(
        model=net, optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type) if needs_scaler else None,
        autocast=autocast, lr=LRSchedule(train_cfg.lr, "constant"), alpha=Ramp(1.0), temperature=Ramp(1.0),
        sampler=BranchSampler(model.num_heads, variant.branch_prob, "step", cfg.seed),
        loss_kwargs=dict(method=variant.method, direction="both", eps=1e-8, label_smoothing=0.0,
                         reference=cfg.reference_loss),
    )
    return Bench(variant, model, parts, Progress(), TrainMeter(model.num_heads, device))


def with_implementation(optimizer: torch.optim.SGD, impl: str) -> torch.optim.SGD:
    """The same SGD (groups, hyperparameters) with torch's fused or foreach kernels, to compare."""
    keys = ("params", "lr", "momentum", "dampening", "weight_decay", "nesterov")
    groups = [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]
    sgd = torch.optim.SGD(groups, **{impl: True})
    if impl == "fused":
        # torch's fused SGD (2.14) raises TypeError when a parameter gets its first gradient after
        # others have momentum buffers: exactly a DHM branch first drawn after step 0. Zero buffers
        # up front avoid it and change nothing (with dampening 0, the first update is buf = grad).
        for g in sgd.param_groups:
            if g["momentum"] > 0:
                for p in g["params"]:
                    sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return sgd


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
    if not bench.parts.sampler.always_all:
        for pattern in flopcount.patterns(bench.model.num_heads):
            step_once(bench, source.next(), pattern)
    sync(device)


def step_once(bench: Bench, batch: tuple[Tensor, Tensor], active: Pattern,
              mark: Callable[[str], contextlib.AbstractContextManager] | None = None) -> None:
    """One step with the library calls the engine makes, for warm-up and profiling (labels `mark`)."""
    mark = mark or (lambda _name: contextlib.nullcontext())
    parts, (images, labels) = bench.parts, batch
    with mark("forward"), parts.autocast():
        outputs = parts.model(images, active=active)
    with mark("loss"):
        loss = dhm_loss(outputs, labels, active=active, **parts.loss_kwargs)
    parts.optimizer.zero_grad(set_to_none=True)
    with mark("backward"):
        (parts.scaler.scale(loss) if parts.scaler else loss).backward()
    with mark("optimizer"):
        if parts.scaler:
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
        else:
            parts.optimizer.step()


# --- loss timing, FLOPs, memory --------------------------------------------------------------------


def make_probes(bench: Bench, source: BatchSource) -> None:
    """Logits of one forward per pattern, kept to time the loss alone on realistic inputs."""
    images, labels = source.next()
    pats = flopcount.patterns(bench.model.num_heads) if not bench.parts.sampler.always_all else \
        [(True,) * bench.model.num_heads]
    with torch.no_grad(), bench.parts.autocast():
        for pat in pats:
            outs = bench.model(images, active=pat)
            bench.probes[pat] = [o.detach().clone() if o is not None else None for o in outs]
    bench.probe_labels = labels


def time_loss(bench: Bench, patterns: list[Pattern], iters: int, device: torch.device) -> list[float]:
    """Seconds of `dhm_loss` forward + its backward (to the logits) for `iters` draws of `patterns`."""
    out = []
    for i in range(iters):
        pat = patterns[i % len(patterns)]
        leaves = [x.clone().requires_grad_() if x is not None else None for x in bench.probes[pat]]
        sync(device)
        t0 = time.perf_counter()
        loss, _ = dhm_loss(leaves, bench.probe_labels, active=pat, return_stats=True,
                           **bench.parts.loss_kwargs)
        loss.backward()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def count_bench(bench: Bench, source: BatchSource, autocast) -> None:
    """FLOPs and saved-activation bytes per image for every pattern this variant can draw."""
    images, labels = source.next()
    images, labels = images[:2], labels[:2]
    pats = flopcount.patterns(bench.model.num_heads) if not bench.parts.sampler.always_all else \
        [(True,) * bench.model.num_heads]
    kwargs = {k: v for k, v in bench.parts.loss_kwargs.items()}
    for pat in pats:
        bench.flops_by_pattern[pat] = flopcount.step_flops(bench.model, images, labels, pat, kwargs, autocast)
        bench.saved_by_pattern[pat] = saved_activation_bytes(bench.model, images, labels, pat, kwargs,
                                                             autocast) // images.shape[0]


def saved_activation_bytes(model: nn.Module, images: Tensor, labels: Tensor, active: Pattern,
                           loss_kwargs: dict, autocast) -> int:
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
        loss = dhm_loss(outputs, labels, active=active, **loss_kwargs)
    del outputs, loss
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


def quantiles(values: list[float]) -> dict[str, float]:
    """median, quartiles, IQR, min, max of a list (n >= 1)."""
    v = sorted(values)
    if len(v) == 1:
        q1 = q3 = v[0]
    else:
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return {"median": statistics.median(v), "q25": q1, "q75": q3, "iqr": q3 - q1, "min": v[0], "max": v[-1],
            "n": len(v)}


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Benchmark every variant; returns the JSON-ready result (also written to cfg.out)."""
    device = resolve_device(cfg.device)
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
    try:
        autocast, needs_scaler = make_autocast(PRECISIONS[cfg.precision], device)
    except UserError as err:
        raise ValueError(str(err).replace("--amp", "--precision")) from None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rss0 = _max_rss_bytes()

    source = BatchSource(cfg, device)
    images, _ = source.next()
    # A real loader decides the resolution, classes and channels.
    cfg.image_size = int(images.shape[-1])
    cfg.num_classes, cfg.in_channels = source.num_classes, source.in_channels
    log(f"{cfg.arch} at {tuple(images.shape[1:])}, batch {cfg.batch_size}, {cfg.precision}, "
        f"{'channels_last' if cfg.channels_last else 'NCHW'}, compile {'on' if cfg.compile else 'off'}, "
        f"{device} ({device_name(device)}), data: {source.name}, loss: {loss_backend(cfg, device)}")

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
    result = summarise(benches, cfg, device, telemetry, traces, source.name)
    if device.type == "cpu":
        result["memory"]["process_rss_growth_bytes"] = max(_max_rss_bytes() - rss0, 0)
    (out / "throughput.json").write_text(json.dumps(result, indent=2))
    print(format_table(result))
    plot(result, out / "throughput.png")
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


def summarise(benches: list[Bench], cfg: BenchConfig, device: torch.device, telemetry: GpuTelemetry,
              traces: list[str], loader_name: str) -> dict[str, Any]:
    assert cfg.batch_size is not None
    base = next(b for b in benches if b.variant.method == "baseline")
    base_block = [sum(t) / len(t) for t in base.step_times]  # mean step time per repeat
    base_flops = base.flops_by_pattern[(True,)][1]
    base_min = min(s for blk in base.step_times for s in blk)
    rows = []
    for b in benches:
        probs = [b.variant.branch_prob] * (b.model.num_heads - 1)
        step_f = {p: f[1] for p, f in b.flops_by_pattern.items()}
        fwd_f = {p: f[0] for p, f in b.flops_by_pattern.items()}
        exp_step = flopcount.expected(step_f, probs) if len(step_f) > 1 else next(iter(step_f.values()))
        exp_fwd = flopcount.expected(fwd_f, probs) if len(fwd_f) > 1 else next(iter(fwd_f.values()))
        saved = flopcount.expected(b.saved_by_pattern, probs) if len(step_f) > 1 else \
            next(iter(b.saved_by_pattern.values()))
        block = [sum(t) / len(t) for t in b.step_times]
        # FLOPs of the patterns actually drawn in each block (sampling makes them vary by block).
        realised = [statistics.fmean(step_f[p] for p in pats) for pats in b.block_patterns]
        ratios = [t / tb for t, tb in zip(block, base_block, strict=True)]
        shares = [statistics.fmean(lt) / statistics.fmean(st)
                  for lt, st in zip(b.loss_times, b.step_times, strict=True)]
        all_steps = [s for blk in b.step_times for s in blk]
        row: dict[str, Any] = {
            "name": b.variant.name, "method": b.variant.method, "branch_prob": b.variant.branch_prob,
            "heads": b.model.num_heads,
            "params": sum(p.numel() for p in b.model.parameters()),
            "img_per_s": quantiles([cfg.batch_size / t for t in block]),
            "step_time_ms": {k: (v * 1e3 if k != "n" else v) for k, v in quantiles(all_steps).items()},
            "flops_per_image": exp_step,
            "forward_flops_per_image": exp_fwd,
            "flop_ratio": exp_step / base_flops,
            "time_ratio": quantiles(ratios),
            "realised_flop_ratio": quantiles([f / base_flops for f in realised]),
            "achieved_gflop_per_s": statistics.median(f * cfg.batch_size / t / 1e9
                                                      for f, t in zip(realised, block, strict=True)),
            "loss_ms": {k: (v * 1e3 if k != "n" else v)
                        for k, v in quantiles([s for blk in b.loss_times for s in blk]).items()},
            "loss_share": quantiles(shares),
            "peak_memory_bytes": b.peak_bytes,
            "saved_activation_bytes_per_image": saved,
            "flops_by_pattern": {pattern_name(p): {"forward": f[0], "step": f[1]}
                                 for p, f in b.flops_by_pattern.items()},
            "telemetry": telemetry.summary(b.variant.name),
            "nonfinite": b.nonfinite,
        }
        row["time_over_flop_ratio"] = row["time_ratio"]["median"] / row["flop_ratio"]
        # Contention on a shared machine only ever adds time, so the fastest step of each variant
        # is a second, noise-robust estimate (not for a sampled variant: its fastest step is simply
        # its cheapest branch pattern).
        row["time_ratio_min"] = min(all_steps) / base_min if len(step_f) == 1 else None
        row["_block"] = block
        row["_realised"] = realised
        rows.append(row)
    targets = evaluate_targets(rows)
    for row in rows:
        del row["_block"], row["_realised"]
    return {
        "schema": SCHEMA,
        "config": {**dataclasses.asdict(cfg), "device": str(device), "loader": loader_name,
                   "optimizer_kernels": optimizer_kernels(base.parts.optimizer)},
        "environment": environment(device),
        "loss_backend": loss_backend(cfg, device),
        "methods": rows,
        "targets": targets,
        "telemetry": telemetry.summary(),
        "memory": {"peak_source": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "n/a (CPU)",
                   "process_rss_growth_bytes": None},
        "profile_traces": traces,
        "notes": [
            "img_per_s: batch / mean step time of each block; quantiles over blocks (repeats).",
            "time_ratio: a variant's block mean step time over the baseline's in the same repeat.",
            "time_ratio_min: fastest step over the baseline's fastest (contention only adds time).",
            "sampling_efficiency: time saved by branch sampling over the time its skipped FLOPs "
            "predict, pooled over repeats (realised branch draws).",
            "flops: torch.utils.flop_counter (convolutions and matrix products) of forward + loss + "
            "backward per image; for a sampled variant the expectation over branch patterns.",
            "loss_share: dhm_loss forward + backward timed alone on the same logits, over the step.",
            "peak_memory_bytes (CUDA): the block's peak minus other variants' resident state.",
        ],
    }


def evaluate_targets(rows: list[dict]) -> dict[str, Any]:
    """Issue 6's targets, measured (reported as pass/fail; never asserted)."""
    by_name = {r["name"]: r for r in rows}
    out: dict[str, Any] = {}
    dhm = by_name.get("dhm")
    if dhm:
        ratio = dhm["time_over_flop_ratio"]
        fastest = dhm["time_ratio_min"] / dhm["flop_ratio"]
        out["dhm_time_over_flop_ratio"] = {"value": ratio, "target": TARGET_TIME_OVER_FLOPS,
                                           "pass": ratio <= TARGET_TIME_OVER_FLOPS,
                                           "value_from_fastest_steps": fastest}
        share = dhm["loss_share"]["median"]
        out["dhm_loss_share"] = {"value": share, "target": TARGET_LOSS_SHARE,
                                 "pass": share < TARGET_LOSS_SHARE}
    for r in rows:
        if r["method"] != "dhm" or r["branch_prob"] >= 1.0 or not dhm:
            continue
        # Per repeat: time saved against full DHM over the time its skipped FLOPs would save.
        # Pooled over repeats (a ratio of sums: a block whose draw skipped nothing predicts no saving
        # and would make a per-repeat ratio meaningless); per-repeat values give the spread.
        saved = predicted = 0.0
        effs = []
        for t_full, t_sampled, f_sampled in zip(dhm["_block"], r["_block"], r["_realised"], strict=True):
            pred = t_full * (1.0 - f_sampled / dhm["flops_per_image"])
            saved, predicted = saved + t_full - t_sampled, predicted + pred
            if pred > 0:
                effs.append((t_full - t_sampled) / pred)
        if predicted > 0:
            value = saved / predicted
            out[f"{r['name']}_sampling_efficiency"] = {"value": value, "spread": quantiles(effs),
                                                        "target": TARGET_SAMPLING_EFFICIENCY,
                                                        "pass": value >= TARGET_SAMPLING_EFFICIENCY}
    return out


def optimizer_kernels(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"


def pattern_name(p: Pattern) -> str:
    return "+".join(n for n, on in zip(("main", "aux1", "aux2", "aux3"), p, strict=False) if on)


def loss_backend(cfg: BenchConfig, device: torch.device) -> str:
    if cfg.reference_loss:
        return "reference (forced)"
    if fused.available() and fused.has_kernel(device.type):
        return "fused"
    return "reference"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() often says only "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.__version__, "python": platform.python_version(), "device_name": device_name(device),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.version.cuda, "hostname": platform.node(),
    }


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --- output ----------------------------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    c = result["config"]
    fmt = "channels_last" if c["channels_last"] else "NCHW"
    head = (f"{c['arch']} @ {c['image_size']}px, batch {c['batch_size']}, {c['precision']}, "
            f"{fmt}, compile {'on' if c['compile'] else 'off'}, SGD {c['optimizer_kernels']}, "
            f"{c['device']} ({result['environment']['device_name']}), loss {result['loss_backend']}, "
            f"{c['repeats']} repeats x {c['steps']} steps")
    cols = ("variant", "img/s [IQR]", "step ms (IQR)", "GFLOP/img", "FLOP x", "time x [IQR]", "time/FLOP",
            "min-step x",
            "GFLOP/s", "loss ms", "loss %", "peak mem", "act MB/img")
    lines = [head, "  ".join(f"{x:>14}" if i else f"{x:<10}" for i, x in enumerate(cols))]
    for r in result["methods"]:
        ips, st, tr = r["img_per_s"], r["step_time_ms"], r["time_ratio"]
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f} MiB" if r["peak_memory_bytes"] else "n/a"
        cells = (r["name"], f"{ips['median']:.1f} [{ips['q25']:.0f}-{ips['q75']:.0f}]",
                 f"{st['median']:.1f} ({st['iqr']:.1f})", f"{r['flops_per_image'] / 1e9:.3f}",
                 f"{r['flop_ratio']:.2f}", f"{tr['median']:.2f} [{tr['q25']:.2f}-{tr['q75']:.2f}]",
                 f"{r['time_over_flop_ratio']:.2f}",
                 f"{r['time_ratio_min']:.2f}" if r["time_ratio_min"] is not None else "-",
                 f"{r['achieved_gflop_per_s']:.1f}",
                 f"{r['loss_ms']['median']:.2f}", f"{100 * r['loss_share']['median']:.2f}", mem,
                 f"{r['saved_activation_bytes_per_image'] / 2**20:.2f}")
        lines.append("  ".join(f"{x:>14}" if i else f"{x:<10}" for i, x in enumerate(cells)))
    for name, t in result["targets"].items():
        op = "<=" if "ratio" in name else "<" if "share" in name else ">="
        extra = (f"; from the fastest steps: {t['value_from_fastest_steps']:.4g}"
                 if "value_from_fastest_steps" in t else "")
        lines.append(f"target {name}: {t['value']:.4g} (target {op} {t['target']}): "
                     f"{'PASS' if t['pass'] else 'MISS'}{extra}")
    tel = result["telemetry"]
    if tel.get("available"):
        for r in result["methods"]:
            s = r["telemetry"]
            lines.append(f"telemetry {r['name']}: " + ", ".join(
                f"{k} {s[k]['mean']:.0f} (max {s[k]['max']:.0f})" for k in TELEMETRY_FIELDS if s.get(k)))
    else:
        lines.append(f"GPU telemetry: {tel['reason']}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Images/s per variant: measured (with the IQR over repeats) beside the FLOP-predicted bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["methods"]
    base = next(r for r in rows if r["method"] == "baseline")
    names = [r["name"] for r in rows]
    measured = [r["img_per_s"]["median"] for r in rows]
    err = [[r["img_per_s"]["median"] - r["img_per_s"]["q25"] for r in rows],
           [r["img_per_s"]["q75"] - r["img_per_s"]["median"] for r in rows]]
    predicted = [base["img_per_s"]["median"] / r["flop_ratio"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4.2))
    ax.bar([i - 0.2 for i in x], measured, 0.4, yerr=err, capsize=3, label="measured (median, IQR)")
    ax.bar([i + 0.2 for i in x], predicted, 0.4, alpha=0.6, label="FLOP-predicted from the baseline")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("training images / s")
    c = result["config"]
    ax.set_title(f"{c['arch']} @ {c['image_size']}px, batch {c['batch_size']}, {c['precision']}, "
                 f"{result['environment']['device_name']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default=d.arch, choices=MODEL_NAMES, metavar="ARCH")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--batch-size", type=int, default=None, help="per device (default 128 on CUDA, 32 on CPU)")
    p.add_argument("--num-classes", type=int, default=None, help="default 1000 (ImageNet archs) or 100")
    p.add_argument("--in-channels", type=int, default=d.in_channels)
    p.add_argument("--methods", default=d.methods, help="variants: baseline, dsl, dks, dhm, dhm-pP "
                   "(DHM with branch probability P)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default=d.precision, choices=tuple(PRECISIONS))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each model (compiled in warm-up)")
    p.add_argument("--loader", default=d.loader, choices=LOADERS, help="synthetic: random batches on the "
                   "device (model only); any other: that real data backend (end to end)")
    p.add_argument("--dataset", default=d.dataset, help="for a real loader")
    p.add_argument("--data-dir", default=None, help="for a real loader")
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps per variant ({FULL['warmup']})")
    p.add_argument("--steps", type=int, default=None, help=f"timed steps per block ({FULL['steps']})")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"blocks per variant, interleaved ({FULL['repeats']})")
    p.add_argument("--loss-iters", type=int, default=None,
                   help="isolated loss timings per block (default: --steps)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--reference-loss", action="store_true",
                   help="use the plain-PyTorch loss, not the fused op")
    p.add_argument("--optimizer-impl", default=d.optimizer_impl, choices=OPTIMIZER_IMPLS,
                   help="SGD kernels: the trainer's choice (dhm_fast.optim), or force fused / foreach")
    p.add_argument("--profile", action="store_true", help="write a torch.profiler Chrome trace per variant")
    p.add_argument("--profile-steps", type=int, default=d.profile_steps)
    p.add_argument("--out", default=d.out)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 1 warm-up step, 2 repeats x 2 steps (explicit flags still win)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = BenchConfig(**{k: v for k, v in vars(args).items()})
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
