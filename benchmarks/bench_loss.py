"""Speed of the fused mimicking loss against plain-PyTorch formulations (forward + backward).

Variants, timed side by side in one process (medians of repeats; shared machines are noisy, so read
the ratios):
  fused        the native op (dhm_fast.fused, kernels/)
  pair_loop    the authors' released formulation: a Python loop over the H(H-1) ordered pairs, each
               with its own softmaxes, eps smoothing, log-ratio, and autograd
  vectorised   the best plain-PyTorch version here: all heads stacked, one softmax, the H x H KL
               matrix as one matrix product; eager, and under torch.compile (vectorised_compiled)
  floor        the one-pass proxy: a single torch.softmax forward over the same [H*B, K] logits
  autograd     the fixed cost every forward + backward pays: the cheapest loss through autograd (the
               sum of every head's logits), forward and .backward(); not a DHM formulation

    python -m benchmarks.bench_loss [--quick] [--device cpu|cuda] [--out bench_out]

Prints a table and writes bench_out/loss_bench.json and bench_out/loss_bench.png. On a GPU it also
reports the fused op's achieved bytes/s against the device's memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dhm_fast import fused

SHAPES = ((3, 256, 1000), (3, 128, 100), (4, 512, 1000), (3, 64, 21843))  # (H, B, K)
TEMPERATURE, ALPHA, EPS = 1.0, 1.0, 1e-8
VARIANTS = ("fused", "pair_loop", "vectorised", "vectorised_compiled", "floor", "autograd")


# ---------------------------------------------------------------------------- the formulations
def pair_loop_loss(logits, target, temperature=TEMPERATURE, alpha=ALPHA, eps=EPS):
    """The release's shape: CE per head, then every ordered pair on its own."""
    k = logits[0].shape[1]
    loss = sum(F.cross_entropy(z.float(), target) for z in logits)
    for i, teacher in enumerate(logits):
        for j, student in enumerate(logits):
            if i == j:
                continue
            p = (F.softmax(teacher.float().detach() / temperature, dim=1) + eps) / (1 + k * eps)
            q = (F.softmax(student.float() / temperature, dim=1) + eps) / (1 + k * eps)
            kl = (p * torch.log(p / q)).sum(dim=1).mean()
            loss = loss + alpha * temperature**2 * kl
    return loss


def vectorised_loss(logits, target, temperature=TEMPERATURE, alpha=ALPHA, eps=EPS):
    """All heads at once: [H, B, K] softmaxes and the KL matrix as entropy minus a matrix product."""
    z = torch.stack(logits).float()
    h, b, k = z.shape
    ce = F.cross_entropy(z.reshape(h * b, k), target.repeat(h), reduction="sum") / b
    q = torch.softmax(z / temperature, dim=2)
    log_q = torch.log(q + eps) - math.log1p(k * eps)
    p = ((q + eps) / (1 + k * eps)).detach()
    p_flat, log_q_flat = p.reshape(h, -1), log_q.reshape(h, -1)
    neg_entropy = (p_flat * log_q_flat.detach()).sum(dim=1)
    cross = p_flat @ log_q_flat.t()  # [teacher, student]
    kl = (neg_entropy.unsqueeze(1) - cross) / b
    off_diagonal = 1.0 - torch.eye(h, device=z.device)
    return ce + alpha * temperature**2 * (off_diagonal * kl).sum()


def sum_loss(logits, target):  # noqa: ARG001 - the loss signature
    """The cheapest loss autograd can run: what a forward + backward costs before any real work."""
    return sum(z.sum() for z in logits)


def fused_call(logits, target, ce_w, kl_w, temperature=TEMPERATURE, alpha=ALPHA, eps=EPS):
    """The op as dhm_loss calls it (weight tensors built once, as dhm_loss caches them)."""
    return fused.fused_loss(logits, target, ce_w, kl_w, temperature, alpha, eps, 0.0)[0]


# ---------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int,
                     warmup: int, clock: Callable[[], float] = time.perf_counter
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Median and minimum seconds of each fn, timed in interleaved rounds so that every variant sees
    the same background load (the machines are shared)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            _sync(device)
            times[name].append(clock() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return medians, {name: min(ts) for name, ts in times.items()}


def forward_backward(loss_fn, leaves, target) -> Callable[[], None]:
    def step() -> None:
        for x in leaves:
            x.grad = None
        loss_fn(leaves, target).backward()

    return step


def device_bandwidth(device: torch.device) -> float | None:
    """Peak memory bandwidth in bytes/s from the device's clock and bus width, when torch knows them."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8  # double data rate
    return None


def run_shape(h, b, k, device, dtype, repeats, warmup, compile_vectorised, clock) -> dict:
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(b, k, generator=gen).mul_(3.0).to(device=device, dtype=dtype) for _ in range(h)]
    target = torch.randint(0, k, (b,), generator=gen).to(device)
    leaves = [x.clone().requires_grad_() for x in base]
    stacked = torch.stack(base).reshape(h * b, k).contiguous()
    row = {"H": h, "B": b, "K": k, "seconds": {}}
    has_fused = fused.available() and fused.has_kernel(device.type)
    ce_w = torch.ones(h, device=device)
    kl_w = (1.0 - torch.eye(h, device=device)).contiguous()
    losses_by_name = {
        "fused": (lambda z, y: fused_call(z, y, ce_w, kl_w)) if has_fused else None,
        "pair_loop": pair_loop_loss,
        "vectorised": vectorised_loss,
        "vectorised_compiled": torch.compile(vectorised_loss, dynamic=False) if compile_vectorised else None,
    }
    fns = {name: forward_backward(fn, leaves, target) for name, fn in losses_by_name.items() if fn}

    def floor() -> None:
        with torch.no_grad():
            torch.softmax(stacked, dim=1)

    fns["floor"] = floor
    fns["autograd"] = forward_backward(sum_loss, leaves, target)
    row["seconds"], row["min_seconds"] = time_round_robin(fns, device, repeats, warmup, clock)
    if device.type == "cuda" and "fused" in row["seconds"]:
        # Forward reads the logits and writes the saved gradient; backward reads it and writes the scaled one.
        moved = 4 * h * b * k * base[0].element_size()
        row["fused_bytes_per_s"] = moved / row["seconds"]["fused"]
        peak = device_bandwidth(device)
        if peak:
            row["fused_bandwidth_fraction"] = row["fused_bytes_per_s"] / peak
    return row


# ---------------------------------------------------------------------------- report
def print_table(rows: list[dict]) -> None:
    names = [v for v in VARIANTS if any(v in r["seconds"] for r in rows)]
    head = f"{'H,B,K':>16} " + " ".join(f"{n:>20}" for n in names)
    head += f" {'loop/fused':>11} {'vec/fused':>10} {'fused/floor':>12} {'(fastest runs)':>14}"
    print(head)
    for r in rows:
        s = r["seconds"]
        cells = " ".join(f"{s[n] * 1e3:>17.3f} ms" if n in s else f"{'-':>20}" for n in names)
        best_vec = min(s[n] for n in ("vectorised", "vectorised_compiled") if n in s)
        ratios = ""
        if "fused" in s:
            f = s["fused"]
            fastest = r["min_seconds"]["fused"] / r["min_seconds"]["floor"]
            ratios = f" {s['pair_loop'] / f:>10.1f}x {best_vec / f:>9.1f}x {f / s['floor']:>11.2f}x {fastest:>13.2f}x"
        print(f"{r['H']},{r['B']},{r['K']:>6}".rjust(16) + " " + cells + ratios)
        if "fused_bytes_per_s" in r:
            frac = r.get("fused_bandwidth_fraction")
            extra = f" ({100 * frac:.0f}% of peak)" if frac else ""
            print(f"{'':>16} fused moves {r['fused_bytes_per_s'] / 1e9:.1f} GB/s{extra}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v in VARIANTS if any(v in r["seconds"] for r in rows)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for n_i, name in enumerate(names):
        xs = [i + n_i * width for i in range(len(rows))]
        ys = [r["seconds"].get(name, float("nan")) * 1e3 for r in rows]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"H={r['H']} B={r['B']} K={r['K']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, ms (median)\nfloor: softmax forward; autograd: sum + backward")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: the calling thread's CPU time, which ignores time spent descheduled on a busy "
        "machine (needs --threads 1 and a CPU device)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no GPU is visible")
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("--clock cpu measures one thread: use it with --threads 1 on the CPU")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (5 if args.quick else 20)
    warmup = 2 if args.quick else 5
    if not (fused.available() and fused.has_kernel(device.type)):
        print(f"note: the fused op has no {device.type} kernel here; timing the other variants only")
    rows = []
    for h, b, k in SHAPES:
        rows.append(run_shape(h, b, k, device, dtype, repeats, warmup, not args.no_compile, clock))
        print(f"done H={h} B={b} K={k}", flush=True)
    print_table(rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = {
        "device": name,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": repeats,
        "clock": args.clock,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "temperature": TEMPERATURE,
        "alpha": ALPHA,
        "eps": EPS,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    title = f"DHM loss, {name}, {args.dtype}, {meta['threads']} threads, {args.clock} clock"
    plot(rows, args.out / "loss_bench.png", title)
    print(f"wrote {args.out / 'loss_bench.json'} and {args.out / 'loss_bench.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
