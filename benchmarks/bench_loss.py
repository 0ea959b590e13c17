"""Speed of the fused mimicking loss against plain-PyTorch formulations (forward + backward).

    python -m benchmarks.bench_loss [--quick] [--device cpu|cuda] [--threads N] [--baseline REV] [--out bench_out]

Variants, timed in interleaved rounds in one process: fused (the trainer's loss call on the native op),
pair_loop (the authors' released loop over head pairs), reference (the trainer's plain-PyTorch backend;
reference_compiled: under torch.compile), floor (one softmax over the same logits) and autograd (a sum
through autograd). With --baseline REV (CPU) also baseline: the loss call and CPU op of git revision REV,
built beside this one, so that old and new are timed side by side. On a GPU also the fused op's bytes/s
against peak bandwidth. Prints a table, writes OUT/loss_bench.json and .png; what each variant is and the
figures: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import option
from dhm_fast import distributed
from dhm_fast.losses import LossConfig, select_backend

SHAPES = ((3, 256, 1000), (3, 128, 100), (4, 512, 1000), (3, 64, 21843))  # (H, B, K)
TEMPERATURE, ALPHA, EPS = 1.0, 1.0, 1e-8
VARIANTS = ("fused", "baseline", "pair_loop", "reference", "reference_compiled", "floor", "autograd")
ROOT = Path(__file__).resolve().parents[1]
# The sources of the CPU op, and how a copy built beside the installed library is renamed so that both
# register (op namespace, Python module) in one process.
OP_SOURCES = ("kernels/fused_loss.cpp", "kernels/fused_loss_cpu.cpp", "kernels/fused_loss.h", "kernels/dhm_row.h")


@dataclass
class LossBenchConfig:
    quick: bool = option(False, "fewer repeats (a smoke run)")
    device: str = option("auto", "auto (cuda when one is visible), cpu or cuda")
    dtype: str = option("float32", choices=("float32", "bfloat16", "float16"))
    repeats: int | None = option(None, "timed repeats per variant (default 20, quick 5)", ge=1)
    no_compile: bool = option(False, "skip the torch.compile variant")
    threads: int | None = option(None, "torch CPU threads (default: torch's)", ge=1)
    baseline: str | None = option(None, "also time the loss call and CPU op of this git revision (e.g. HEAD~3), "
                                  "built under build/bench_loss/")
    only: str | None = option(None, "time only these variants, comma-separated (floor and autograd always run)")
    clock: str = option("wall", "wall: elapsed time; thread: this thread's CPU time, robust against other "
                        "processes on a shared machine (with --threads 1 only)", choices=("wall", "thread"))
    out: Path = option(Path("bench_out"))


# ---------------------------------------------------------------------------- the formulations
def pair_loop_loss(logits, target):
    """The release's shape: CE per head, then every ordered pair on its own."""
    k = logits[0].shape[1]
    loss = sum(F.cross_entropy(z.float(), target) for z in logits)
    for i, teacher in enumerate(logits):
        for j, student in enumerate(logits):
            if i != j:
                p = (F.softmax(teacher.float().detach() / TEMPERATURE, dim=1) + EPS) / (1 + k * EPS)
                q = (F.softmax(student.float() / TEMPERATURE, dim=1) + EPS) / (1 + k * EPS)
                loss = loss + ALPHA * TEMPERATURE**2 * (p * torch.log(p / q)).sum(dim=1).mean()
    return loss


def sum_loss(logits, target):  # noqa: ARG001 - the loss signature
    """The cheapest loss autograd can run: what a forward + backward costs before any real work."""
    return sum(z.sum() for z in logits)


def config_loss(config: LossConfig):
    """The trainer's call (`LossConfig.compute`) as a (logits, target) -> loss function."""
    return lambda logits, target: config.compute(logits, target, alpha=ALPHA, temperature=TEMPERATURE)[0]


def compiled_reference(h: int, device: torch.device):
    """The reference backend under torch.compile, with the weights `compute` would pass it."""
    backend = torch.compile(select_backend(device, reference=True).run, dynamic=False)
    ce_w = torch.ones(h, device=device)
    kl_w = (1.0 - torch.eye(h, device=device)).contiguous()
    return lambda logits, target: backend(logits, target, ce_w, kl_w, TEMPERATURE, ALPHA, EPS, 0.0)[0]


# ---------------------------------------------------------------------------- timing
def forward_backward(loss_fn, leaves, target) -> Callable[[], None]:
    def step() -> None:
        for x in leaves:
            x.grad = None
        loss_fn(leaves, target).backward()

    return step


def softmax_pass(base) -> Callable[[], None]:
    """The floor: one softmax forward over all heads' logits, [H*B, K]."""
    stacked = torch.stack(base).flatten(0, 1).contiguous()

    def floor() -> None:
        with torch.no_grad():
            torch.softmax(stacked, dim=1)

    return floor


def device_bandwidth(device: torch.device) -> float | None:
    """Peak memory bandwidth in bytes/s from the device's clock and bus width, when torch knows them."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None  # double data rate


# ---------------------------------------------------------------------------- an older build beside this one
def baseline_losses(rev: str):
    """dhm_fast/losses.py of git revision `rev` as a module whose fused op is that revision's CPU op, built
    (once per commit, under build/bench_loss/) with its own op namespace and loaded beside the installed one."""
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    name = f"dhm_fast_baseline_{sha[:12]}"
    src = ROOT / "build" / "bench_loss" / sha[:12]
    src.mkdir(parents=True, exist_ok=True)
    renames = {"TORCH_LIBRARY(dhm_fast,": f"TORCH_LIBRARY({name},",
               "TORCH_LIBRARY_IMPL(dhm_fast,": f"TORCH_LIBRARY_IMPL({name},",
               '"dhm_fast::fused_loss"': f'"{name}::fused_loss"', 'm.set_python_module("kernels");': "",
               "PyInit__C": f"PyInit_{name}", '"kernels._C"': f'"{name}"'}
    for path in OP_SOURCES:
        text = _git("show", f"{sha}:{path}")
        for old, new in renames.items():
            text = text.replace(old, new)
        out = src / Path(path).name
        if not out.exists() or out.read_text() != text:  # unchanged sources: ninja rebuilds nothing
            out.write_text(text)
    from torch.utils.cpp_extension import load

    common.log(f"building the CPU op of {rev} ({sha[:12]}) in {src}")
    module = load(name, [str(src / "fused_loss.cpp"), str(src / "fused_loss_cpu.cpp")],
                  extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math"], extra_ldflags=["-fopenmp"],
                  extra_include_paths=[str(src)], build_directory=str(src))
    code = _git("show", f"{sha}:dhm_fast/losses.py")
    for old, new in (("kernels.op(FUSED_OP)", "_BASELINE_OP"), ("kernels.eager_entry(FUSED_OP)", "_BASELINE_EAGER")):
        code = code.replace(old, new)
    losses = types.ModuleType(f"{name}_losses")
    losses.__dict__.update(_BASELINE_OP=getattr(torch.ops, name).fused_loss,
                           _BASELINE_EAGER=getattr(module, "fused_loss_eager", None))
    sys.modules[losses.__name__] = losses  # dataclasses look their module up
    exec(compile(code, f"{rev}:dhm_fast/losses.py", "exec"), losses.__dict__)
    return losses


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"--baseline: git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


# ---------------------------------------------------------------------------- the variants
def variants(h, b, k, device, dtype, compile_reference: bool, baseline=None,
             only: set[str] | None = None) -> dict[str, Callable[[], None]]:
    """Each variant's forward + backward on the same random logits (scale 3), as a timed callable."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(b, k, generator=gen).mul_(3.0).to(device=device, dtype=dtype) for _ in range(h)]
    target = torch.randint(0, k, (b,), generator=gen).to(device)
    leaves = [x.clone().requires_grad_() for x in base]
    losses = {
        "fused": config_loss(LossConfig(eps=EPS)) if select_backend(device).name == "fused" else None,
        "baseline": config_loss(baseline.LossConfig(eps=EPS)) if baseline is not None else None,
        "pair_loop": pair_loop_loss,
        "reference": config_loss(LossConfig(eps=EPS, reference=True)),
        "reference_compiled": compiled_reference(h, device) if compile_reference else None,
    }
    fns = {name: forward_backward(fn, leaves, target) for name, fn in losses.items()
           if fn and (only is None or name in only)}
    return {**fns, "floor": softmax_pass(base), "autograd": forward_backward(sum_loss, leaves, target)}


def run_shape(h, b, k, device, dtype, repeats, warmup, compile_reference, baseline=None, only=None,
              clock=time.perf_counter) -> dict:
    fns = variants(h, b, k, device, dtype, compile_reference and (only is None or "reference_compiled" in only),
                   baseline, only)
    times = common.time_round_robin(fns, device, repeats, warmup, clock)
    stats = {name: common.quantiles(ts) for name, ts in times.items()}
    row = {"H": h, "B": b, "K": k, "seconds": {n: q["median"] for n, q in stats.items()},
           "min_seconds": {n: q["min"] for n, q in stats.items()}}
    if device.type == "cuda" and "fused" in row["seconds"]:
        # Forward reads the logits and writes the saved gradient; backward reads it and writes the scaled one.
        row["fused_bytes_per_s"] = 4 * h * b * k * dtype.itemsize / row["seconds"]["fused"]
        peak = device_bandwidth(device)
        if peak:
            row["fused_bandwidth_fraction"] = row["fused_bytes_per_s"] / peak
    return row


# ---------------------------------------------------------------------------- report
def print_table(rows: list[dict]) -> None:
    names = [v for v in VARIANTS if any(v in r["seconds"] for r in rows)]
    ratios = {  # name: (numerator, denominator), shown where both were timed
        "loop/fused": ("pair_loop", "fused"), "ref/fused": ("reference", "fused"),
        "fused/floor": ("fused", "floor"), "fused/autograd": ("fused", "autograd"),
        "fused/baseline": ("fused", "baseline"), "baseline/autograd": ("baseline", "autograd")}
    shown = [n for n, (a, b) in ratios.items() if any(a in r["seconds"] and b in r["seconds"] for r in rows)]
    print(f"{'H,B,K':>16} " + " ".join(f"{n:>20}" for n in names) + "".join(f" {n:>17}" for n in shown)
          + f" {'fused/floor (fastest runs)':>26}")
    for r in rows:
        s, shape = r["seconds"], f"{r['H']},{r['B']},{r['K']:>6}".rjust(16)
        cells = " ".join(f"{s[n] * 1e3:>17.3f} ms" if n in s else f"{'-':>20}" for n in names)
        cells += "".join(f" {s[a] / s[b]:>16.2f}x" if a in s and b in s else f" {'-':>17}"
                         for a, b in (ratios[n] for n in shown))
        if "fused" in s:
            cells += f" {r['min_seconds']['fused'] / r['min_seconds']['floor']:>25.2f}x"
        print(f"{shape} {cells}")
        if "fused_bytes_per_s" in r:
            frac = r.get("fused_bandwidth_fraction")
            print(f"{'':>16} fused moves {r['fused_bytes_per_s'] / 1e9:.1f} GB/s"
                  + (f" ({100 * frac:.0f}% of peak)" if frac else ""))


def plot(rows: list[dict], path: Path, title: str) -> None:
    names = [v for v in VARIANTS if any(v in r["seconds"] for r in rows)]
    width = 0.8 / len(names)
    with common.figure(path, figsize=(10, 4.5)) as (_, ax):
        for n_i, name in enumerate(names):
            ax.bar([i + n_i * width for i in range(len(rows))],
                   [r["seconds"].get(name, float("nan")) * 1e3 for r in rows], width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))],
                      [f"H={r['H']} B={r['B']} K={r['K']}" for r in rows])
        ax.set(yscale="log", title=title,
               ylabel="forward + backward, ms (median)\nfloor: softmax forward; autograd: sum + backward")
        ax.legend(fontsize=8)


def run(args: LossBenchConfig, argv: list[str] | None) -> None:
    common.check(args)
    common.output_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.process_device(args.device, distributed.World())
    if args.clock == "thread" and torch.get_num_threads() != 1:
        raise ValueError("--clock thread measures one thread's CPU time: run it with --threads 1")
    if args.baseline and device.type != "cpu":
        raise ValueError("--baseline builds the CPU op only: use it with --device cpu")
    only = set(args.only.split(",")) if args.only else None
    unknown = sorted((only or set()) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--only: unknown variant(s) {', '.join(unknown)}; choose among {', '.join(VARIANTS)}")
    dtype = getattr(torch, args.dtype)
    repeats, warmup = args.repeats or (5 if args.quick else 20), 2 if args.quick else 5
    backend = select_backend(device)
    if backend.name != "fused":
        print(f"note: {backend.reason}; timing the other variants only")
    baseline = baseline_losses(args.baseline) if args.baseline else None
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    rows = []
    for h, b, k in SHAPES:
        rows.append(run_shape(h, b, k, device, dtype, repeats, warmup, not args.no_compile, baseline, only, clock))
        common.log(f"done H={h} B={b} K={k}")
    print_table(rows)
    meta = {**common.environment(device, "benchmarks.bench_loss", argv), "dtype": args.dtype,
            "threads": torch.get_num_threads(), "repeats": repeats, "fused_backend": backend.reason,
            "temperature": TEMPERATURE, "alpha": ALPHA, "eps": EPS, "baseline": args.baseline,
            "clock": args.clock}
    (args.out / "loss_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, args.out / "loss_bench.png", f"DHM loss, {meta['device_name']}, {args.dtype}, {meta['threads']} threads")
    print(f"wrote {args.out / 'loss_bench.json'} and {args.out / 'loss_bench.png'}")


def main(argv: list[str] | None = None) -> int:
    args = common.parse_settings(LossBenchConfig, "benchmarks.bench_loss", __doc__, argv)
    return common.cli(lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
