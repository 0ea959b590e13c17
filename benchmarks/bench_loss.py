"""Speed of the fused mimicking loss against plain-PyTorch formulations (forward + backward).

    python -m benchmarks.bench_loss [--quick] [--device cpu|cuda] [--threads N] [--out bench_out]

Variants, timed in interleaved rounds in one process: fused (the trainer's loss call on the native op),
pair_loop (the authors' released loop over head pairs), reference (the trainer's plain-PyTorch backend;
reference_compiled: under torch.compile), floor (one softmax over the same logits) and autograd (a sum
through autograd). On a GPU also the fused op's bytes/s against peak bandwidth. Prints a table, writes
OUT/loss_bench.json and .png; what each variant is and the figures: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import sys
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
VARIANTS = ("fused", "pair_loop", "reference", "reference_compiled", "floor", "autograd")


@dataclass
class LossBenchConfig:
    quick: bool = option(False, "fewer repeats (a smoke run)")
    device: str = option("auto", "auto (cuda when one is visible), cpu or cuda")
    dtype: str = option("float32", choices=("float32", "bfloat16", "float16"))
    repeats: int | None = option(None, "timed repeats per variant (default 20, quick 5)", ge=1)
    no_compile: bool = option(False, "skip the torch.compile variant")
    threads: int | None = option(None, "torch CPU threads (default: torch's)", ge=1)
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


def variants(h, b, k, device, dtype, compile_reference: bool) -> dict[str, Callable[[], None]]:
    """Each variant's forward + backward on the same random logits (scale 3), as a timed callable."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(b, k, generator=gen).mul_(3.0).to(device=device, dtype=dtype) for _ in range(h)]
    target = torch.randint(0, k, (b,), generator=gen).to(device)
    leaves = [x.clone().requires_grad_() for x in base]
    losses = {
        "fused": config_loss(LossConfig(eps=EPS)) if select_backend(device).name == "fused" else None,
        "pair_loop": pair_loop_loss,
        "reference": config_loss(LossConfig(eps=EPS, reference=True)),
        "reference_compiled": compiled_reference(h, device) if compile_reference else None,
    }
    fns = {name: forward_backward(fn, leaves, target) for name, fn in losses.items() if fn}
    return {**fns, "floor": softmax_pass(base), "autograd": forward_backward(sum_loss, leaves, target)}


def run_shape(h, b, k, device, dtype, repeats, warmup, compile_reference) -> dict:
    times = common.time_round_robin(variants(h, b, k, device, dtype, compile_reference), device, repeats, warmup)
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
    print(f"{'H,B,K':>16} " + " ".join(f"{n:>20}" for n in names)
          + f" {'loop/fused':>11} {'ref/fused':>10} {'fused/floor':>12} {'(fastest runs)':>14}")
    for r in rows:
        s, shape = r["seconds"], f"{r['H']},{r['B']},{r['K']:>6}".rjust(16)
        cells = " ".join(f"{s[n] * 1e3:>17.3f} ms" if n in s else f"{'-':>20}" for n in names)
        ratios = ""
        if "fused" in s:
            f, best_ref = s["fused"], min(s[n] for n in ("reference", "reference_compiled") if n in s)
            fastest = r["min_seconds"]["fused"] / r["min_seconds"]["floor"]
            ratios = f" {s['pair_loop'] / f:>10.1f}x {best_ref / f:>9.1f}x {f / s['floor']:>11.2f}x {fastest:>13.2f}x"
        print(f"{shape} {cells}{ratios}")
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
    dtype = getattr(torch, args.dtype)
    repeats, warmup = args.repeats or (5 if args.quick else 20), 2 if args.quick else 5
    backend = select_backend(device)
    if backend.name != "fused":
        print(f"note: {backend.reason}; timing the other variants only")
    rows = []
    for h, b, k in SHAPES:
        rows.append(run_shape(h, b, k, device, dtype, repeats, warmup, not args.no_compile))
        common.log(f"done H={h} B={b} K={k}")
    print_table(rows)
    meta = {**common.environment(device, "benchmarks.bench_loss", argv), "dtype": args.dtype,
            "threads": torch.get_num_threads(), "repeats": repeats, "fused_backend": backend.reason,
            "temperature": TEMPERATURE, "alpha": ALPHA, "eps": EPS}
    (args.out / "loss_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, args.out / "loss_bench.png", f"DHM loss, {meta['device_name']}, {args.dtype}, {meta['threads']} threads")
    print(f"wrote {args.out / 'loss_bench.json'} and {args.out / 'loss_bench.png'}")


def main(argv: list[str] | None = None) -> int:
    args = common.parse_settings(LossBenchConfig, "benchmarks.bench_loss", __doc__, argv)
    return common.cli(lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
