"""Speed of the fused mimicking loss against plain-PyTorch formulations (forward + backward).

Variants, timed side by side in one process (medians of repeats; shared machines are noisy, so read
the ratios):
  fused        the trainer's loss call (`LossConfig.compute`) on the native op's backend
  pair_loop    the authors' released formulation: a Python loop over the H(H-1) ordered pairs, each
               with its own softmaxes, eps smoothing, log-ratio, and autograd
  reference    the trainer's loss call on the plain-PyTorch backend (`LossConfig(reference=True)`:
               all heads stacked, one softmax, the H x H KL matrix as one matrix product); eager, and
               that backend under torch.compile (reference_compiled)
  floor        the one-pass proxy: a single torch.softmax forward over the same [H*B, K] logits
  autograd     the fixed cost every forward + backward pays: the cheapest loss through autograd (the
               sum of every head's logits), forward and .backward(); not a DHM formulation

On the CPU it also measures thread scaling: the fused op and the softmax at 1 and 2 threads, and
each one's 2-thread speed-up (t1 / t2); the softmax's is what a well-parallelised pass achieves.

    python -m benchmarks.bench_loss [--quick] [--device cpu|cuda] [--out bench_out]

Prints a table and writes bench_out/loss_bench.json and bench_out/loss_bench.png. On a GPU it also
reports the fused op's achieved bytes/s against the device's memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from dhm_fast.losses import LossConfig, select_backend

SHAPES = ((3, 256, 1000), (3, 128, 100), (4, 512, 1000), (3, 64, 21843))  # (H, B, K)
TEMPERATURE, ALPHA, EPS = 1.0, 1.0, 1e-8
VARIANTS = ("fused", "pair_loop", "reference", "reference_compiled", "floor", "autograd")
SCALING_THREADS = (1, 2)


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


def sum_loss(logits, target):  # noqa: ARG001 - the loss signature
    """The cheapest loss autograd can run: what a forward + backward costs before any real work."""
    return sum(z.sum() for z in logits)


def config_loss(config: LossConfig):
    """The trainer's call (`LossConfig.compute`) as a (logits, target) -> loss function."""
    def loss(logits, target):
        return config.compute(logits, target, alpha=ALPHA, temperature=TEMPERATURE)[0]

    return loss


def compiled_reference(h: int, device: torch.device):
    """The reference backend under torch.compile, with the weights `compute` would pass it."""
    backend = torch.compile(select_backend(device, reference=True).run, dynamic=False)
    ce_w = torch.ones(h, device=device)
    kl_w = (1.0 - torch.eye(h, device=device)).contiguous()

    def loss(logits, target):
        return backend(logits, target, ce_w, kl_w, TEMPERATURE, ALPHA, EPS, 0.0)[0]

    return loss


# ---------------------------------------------------------------------------- timing
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


def make_inputs(h, b, k, device, dtype):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(b, k, generator=gen).mul_(3.0).to(device=device, dtype=dtype) for _ in range(h)]
    target = torch.randint(0, k, (b,), generator=gen).to(device)
    return base, target


def softmax_pass(base) -> Callable[[], None]:
    """The floor: one softmax forward over all heads' logits, [H*B, K]."""
    h, (b, k) = len(base), base[0].shape
    stacked = torch.stack(base).reshape(h * b, k).contiguous()

    def floor() -> None:
        with torch.no_grad():
            torch.softmax(stacked, dim=1)

    return floor


def median_and_min(times: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    stats = {name: common.quantiles(ts) for name, ts in times.items()}
    return {n: q["median"] for n, q in stats.items()}, {n: q["min"] for n, q in stats.items()}


def run_shape(h, b, k, device, dtype, repeats, warmup, compile_reference, clock) -> dict:
    base, target = make_inputs(h, b, k, device, dtype)
    leaves = [x.clone().requires_grad_() for x in base]
    row = {"H": h, "B": b, "K": k, "seconds": {}}
    losses_by_name = {
        "fused": config_loss(LossConfig(eps=EPS)) if select_backend(device).name == "fused" else None,
        "pair_loop": pair_loop_loss,
        "reference": config_loss(LossConfig(eps=EPS, reference=True)),
        "reference_compiled": compiled_reference(h, device) if compile_reference else None,
    }
    fns = {name: forward_backward(fn, leaves, target) for name, fn in losses_by_name.items() if fn}
    fns["floor"] = softmax_pass(base)
    fns["autograd"] = forward_backward(sum_loss, leaves, target)
    times = common.time_round_robin(fns, device, repeats, warmup, clock)
    row["seconds"], row["min_seconds"] = median_and_min(times)
    if device.type == "cuda" and "fused" in row["seconds"]:
        # Forward reads the logits and writes the saved gradient; backward reads it and writes the scaled one.
        moved = 4 * h * b * k * base[0].element_size()
        row["fused_bytes_per_s"] = moved / row["seconds"]["fused"]
        peak = device_bandwidth(device)
        if peak:
            row["fused_bandwidth_fraction"] = row["fused_bytes_per_s"] / peak
    return row


def thread_scaling(h, b, k, dtype, repeats, warmup) -> dict:
    """CPU: median seconds of the fused op (forward + backward) and of the softmax pass at each of
    SCALING_THREADS threads (wall clock), and each one's speed-up from the first count to the last."""
    device = torch.device("cpu")
    base, target = make_inputs(h, b, k, device, dtype)
    leaves = [x.clone().requires_grad_() for x in base]
    fns = {"softmax": softmax_pass(base)}
    if select_backend(device).name == "fused":
        fns["fused"] = forward_backward(config_loss(LossConfig(eps=EPS)), leaves, target)
    before = torch.get_num_threads()
    seconds: dict[str, dict[int, float]] = {name: {} for name in fns}
    try:
        for n in SCALING_THREADS:
            torch.set_num_threads(n)
            medians, _ = median_and_min(common.time_round_robin(fns, device, repeats, warmup))
            for name, t in medians.items():
                seconds[name][n] = t
    finally:
        torch.set_num_threads(before)
    first, last = SCALING_THREADS[0], SCALING_THREADS[-1]
    return {"threads": list(SCALING_THREADS), "seconds": seconds,
            "speedup": {name: s[first] / s[last] for name, s in seconds.items()}}


# ---------------------------------------------------------------------------- report
def print_table(rows: list[dict]) -> None:
    names = [v for v in VARIANTS if any(v in r["seconds"] for r in rows)]
    head = f"{'H,B,K':>16} " + " ".join(f"{n:>20}" for n in names)
    head += f" {'loop/fused':>11} {'ref/fused':>10} {'fused/floor':>12} {'(fastest runs)':>14}"
    print(head)
    for r in rows:
        s = r["seconds"]
        cells = " ".join(f"{s[n] * 1e3:>17.3f} ms" if n in s else f"{'-':>20}" for n in names)
        best_vec = min(s[n] for n in ("reference", "reference_compiled") if n in s)
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
    scaled = [r for r in rows if "scaling" in r]
    if scaled:
        first, last = SCALING_THREADS[0], SCALING_THREADS[-1]
        print(f"\nthread scaling (CPU, wall clock, medians): {first} -> {last} threads")
        print(f"{'H,B,K':>16} {'fused ' + str(first) + 't':>12} {'fused ' + str(last) + 't':>12} "
              f"{'fused speed-up':>15} {'softmax ' + str(first) + 't':>14} {'softmax ' + str(last) + 't':>14} "
              f"{'softmax speed-up':>17}")
        for r in scaled:
            sc = r["scaling"]
            fused_cells = f"{'-':>41}"
            if "fused" in sc["seconds"]:
                f1, f2 = sc["seconds"]["fused"][first], sc["seconds"]["fused"][last]
                fused_cells = f"{f1 * 1e3:>9.3f} ms {f2 * 1e3:>9.3f} ms {sc['speedup']['fused']:>14.2f}x"
            soft = sc["seconds"]["softmax"]
            print(f"{r['H']},{r['B']},{r['K']:>6}".rjust(16) + f" {fused_cells} {soft[first] * 1e3:>11.3f} ms "
                  f"{soft[last] * 1e3:>11.3f} ms {sc['speedup']['softmax']:>16.2f}x")


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
    parser.add_argument("--no-scaling", action="store_true",
                        help="skip the CPU thread-scaling measurement (1 and 2 threads)")
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
    backend = select_backend(device)
    if backend.name != "fused":
        print(f"note: {backend.reason}; timing the other variants only")
    scaling = device.type == "cpu" and not args.no_scaling
    rows = []
    for h, b, k in SHAPES:
        row = run_shape(h, b, k, device, dtype, repeats, warmup, not args.no_compile, clock)
        if scaling:
            row["scaling"] = thread_scaling(h, b, k, dtype, repeats, warmup)
        rows.append(row)
        common.log(f"done H={h} B={b} K={k}")
    print_table(rows)
    meta = {
        **common.environment(device, "benchmarks.bench_loss", argv),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "clock": args.clock,
        "fused_backend": backend.reason,
        "temperature": TEMPERATURE,
        "alpha": ALPHA,
        "eps": EPS,
    }
    name = meta["device_name"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    title = f"DHM loss, {name}, {args.dtype}, {meta['threads']} threads, {args.clock} clock"
    plot(rows, args.out / "loss_bench.png", title)
    print(f"wrote {args.out / 'loss_bench.json'} and {args.out / 'loss_bench.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
