"""The report of the throughput benchmark: per-variant figures from the measured step times, the
targets checked against them, the printed table and the bar chart (see `benchmarks.throughput`)."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks import flops as flopcount
from benchmarks.common import environment, figure, quantiles
from dhm_fast.telemetry import FIELDS as TELEMETRY_FIELDS
from dhm_fast.telemetry import GpuTelemetry

if TYPE_CHECKING:
    from benchmarks.throughput import Bench, BenchConfig

SCHEMA = "dhm_fast.throughput/1"
# Targets checked on every run and reported (never asserted).
TARGET_TIME_OVER_FLOPS = 1.10  # DHM time ratio / FLOP ratio, both against the baseline
TARGET_LOSS_SHARE = 0.02  # loss forward + backward over a DHM step
TARGET_SAMPLING_EFFICIENCY = 0.70  # time saved by branch sampling / time the skipped FLOPs predict


def _ms(q: dict[str, float]) -> dict[str, float]:
    return {k: (v * 1e3 if k != "n" else v) for k, v in q.items()}


def variant_row(b: Bench, cfg: BenchConfig, base_block: list[float], base_flops: int, base_min: float,
                telemetry: GpuTelemetry) -> dict[str, Any]:
    """One variant's figures; `_block` and `_realised` are kept for the targets, then dropped."""
    assert cfg.batch_size is not None
    probs = [b.variant.branch_prob] * (b.model.num_heads - 1)
    step_f = {p: f[1] for p, f in b.flops_by_pattern.items()}
    exp_step = flopcount.expected(step_f, probs)
    block = [sum(t) / len(t) for t in b.step_times]  # mean step time per repeat
    # FLOPs of the patterns actually drawn in each block (sampling makes them vary by block).
    realised = [statistics.fmean(step_f[p] for p in pats) for pats in b.block_patterns]
    all_steps = [s for blk in b.step_times for s in blk]
    row: dict[str, Any] = {
        "name": b.variant.name, "method": b.variant.method, "branch_prob": b.variant.branch_prob,
        "heads": b.model.num_heads, "params": sum(p.numel() for p in b.model.parameters()),
        "img_per_s": quantiles([cfg.batch_size / t for t in block]),
        "step_time_ms": _ms(quantiles(all_steps)),
        "flops_per_image": exp_step,
        "forward_flops_per_image": flopcount.expected({p: f[0] for p, f in b.flops_by_pattern.items()}, probs),
        "flop_ratio": exp_step / base_flops,
        "time_ratio": quantiles([t / tb for t, tb in zip(block, base_block, strict=True)]),
        "realised_flop_ratio": quantiles([f / base_flops for f in realised]),
        "achieved_gflop_per_s": statistics.median(f * cfg.batch_size / t / 1e9
                                                  for f, t in zip(realised, block, strict=True)),
        "loss_ms": _ms(quantiles([s for blk in b.loss_times for s in blk])),
        "loss_share": quantiles([statistics.fmean(lt) / statistics.fmean(st)
                                 for lt, st in zip(b.loss_times, b.step_times, strict=True)]),
        "peak_memory_bytes": b.peak_bytes,
        "saved_activation_bytes_per_image": flopcount.expected(b.saved_by_pattern, probs),
        "flops_by_pattern": {pattern_name(p): {"forward": f[0], "step": f[1]} for p, f in b.flops_by_pattern.items()},
        "telemetry": telemetry.summary(b.variant.name),
        "nonfinite": b.nonfinite,
    }
    row["time_over_flop_ratio"] = row["time_ratio"]["median"] / row["flop_ratio"]
    # Contention on a shared machine only ever adds time, so the fastest step of each variant is a
    # second, noise-robust estimate (not for a sampled variant: its fastest step is simply its
    # cheapest branch pattern).
    row["time_ratio_min"] = min(all_steps) / base_min if len(step_f) == 1 else None
    row["_block"], row["_realised"] = block, realised
    return row


def summarise(benches: list[Bench], cfg: BenchConfig, device: torch.device, telemetry: GpuTelemetry,
              traces: list[str], loader_name: str, loss_backend: str, argv: list[str] | None) -> dict[str, Any]:
    """The JSON-ready result of a run."""
    base = next(b for b in benches if b.variant.method == "baseline")
    base_block = [sum(t) / len(t) for t in base.step_times]
    base_flops = base.flops_by_pattern[(True,)][1]
    base_min = min(s for blk in base.step_times for s in blk)
    rows = [variant_row(b, cfg, base_block, base_flops, base_min, telemetry) for b in benches]
    targets = evaluate_targets(rows)
    for row in rows:
        del row["_block"], row["_realised"]
    d = base.parts.optimizer.defaults
    kernels = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"
    return {
        "schema": SCHEMA,
        "config": {**dataclasses.asdict(cfg), "device": str(device), "loader": loader_name,
                   "optimizer_kernels": kernels},
        "environment": environment(device, "benchmarks.throughput", argv),
        "loss_backend": loss_backend, "methods": rows, "targets": targets, "telemetry": telemetry.summary(),
        "memory": {"peak_source": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "n/a (CPU)"},
        "profile_traces": traces, "notes": "what each figure means: docs/benchmarks.md",
    }


def evaluate_targets(rows: list[dict]) -> dict[str, Any]:
    """The targets, measured (reported as pass/fail; never asserted)."""
    dhm = next((r for r in rows if r["name"] == "dhm"), None)
    if not dhm:
        return {}
    ratio, share = dhm["time_over_flop_ratio"], dhm["loss_share"]["median"]
    out: dict[str, Any] = {
        "dhm_time_over_flop_ratio": {"value": ratio, "target": TARGET_TIME_OVER_FLOPS,
                                     "pass": ratio <= TARGET_TIME_OVER_FLOPS,
                                     "value_from_fastest_steps": dhm["time_ratio_min"] / dhm["flop_ratio"]},
        "dhm_loss_share": {"value": share, "target": TARGET_LOSS_SHARE, "pass": share < TARGET_LOSS_SHARE}}
    for r in rows:
        if r["method"] != "dhm" or r["branch_prob"] >= 1.0:
            continue
        # Time saved against full DHM over the time its skipped FLOPs would save, pooled over repeats
        # (a ratio of sums: a block whose draw skipped nothing predicts no saving and would make a
        # per-repeat ratio meaningless); per-repeat values give the spread.
        blocks = list(zip(dhm["_block"], r["_block"], r["_realised"], strict=True))
        saved = [t_full - t for t_full, t, _ in blocks]
        predicted = [t_full * (1.0 - f / dhm["flops_per_image"]) for t_full, _, f in blocks]
        if sum(predicted) > 0:
            value = sum(saved) / sum(predicted)
            effs = [s / p for s, p in zip(saved, predicted, strict=True) if p > 0]
            out[f"{r['name']}_sampling_efficiency"] = {"value": value, "spread": quantiles(effs),
                                                        "target": TARGET_SAMPLING_EFFICIENCY,
                                                        "pass": value >= TARGET_SAMPLING_EFFICIENCY}
    return out


def pattern_name(p: tuple[bool, ...]) -> str:
    return "+".join(n for n, on in zip(("main", "aux1", "aux2", "aux3"), p, strict=False) if on)


def format_table(result: dict[str, Any]) -> str:
    c = result["config"]
    head = (f"{c['arch']} @ {c['image_size']}px, batch {c['batch_size']}, {c['precision']}, "
            f"{'channels_last' if c['channels_last'] else 'NCHW'}, compile {'on' if c['compile'] else 'off'}, "
            f"SGD {c['optimizer_kernels']}, {c['device']} ({result['environment']['device_name']}), "
            f"loss {result['loss_backend']}, {c['repeats']} repeats x {c['steps']} steps")
    cols = ("variant", "img/s [IQR]", "step ms (IQR)", "GFLOP/img", "FLOP x", "time x [IQR]", "time/FLOP",
            "min-step x", "GFLOP/s", "loss ms", "loss %", "peak mem", "act MB/img")
    lines = [head, "  ".join(f"{x:>14}" if i else f"{x:<10}" for i, x in enumerate(cols))]
    for r in result["methods"]:
        ips, st, tr = r["img_per_s"], r["step_time_ms"], r["time_ratio"]
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f} MiB" if r["peak_memory_bytes"] else "n/a"
        cells = (r["name"], f"{ips['median']:.1f} [{ips['q25']:.0f}-{ips['q75']:.0f}]",
                 f"{st['median']:.1f} ({st['iqr']:.1f})", f"{r['flops_per_image'] / 1e9:.3f}",
                 f"{r['flop_ratio']:.2f}", f"{tr['median']:.2f} [{tr['q25']:.2f}-{tr['q75']:.2f}]",
                 f"{r['time_over_flop_ratio']:.2f}",
                 f"{r['time_ratio_min']:.2f}" if r["time_ratio_min"] is not None else "-",
                 f"{r['achieved_gflop_per_s']:.1f}", f"{r['loss_ms']['median']:.2f}",
                 f"{100 * r['loss_share']['median']:.2f}", mem,
                 f"{r['saved_activation_bytes_per_image'] / 2**20:.2f}")
        lines.append("  ".join(f"{x:>14}" if i else f"{x:<10}" for i, x in enumerate(cells)))
    for name, t in result["targets"].items():
        op = "<=" if "ratio" in name else "<" if "share" in name else ">="
        extra = (f"; from the fastest steps: {t['value_from_fastest_steps']:.4g}"
                 if "value_from_fastest_steps" in t else "")
        lines.append(f"target {name}: {t['value']:.4g} (target {op} {t['target']}): "
                     f"{'PASS' if t['pass'] else 'MISS'}{extra}")
    if result["telemetry"].get("available"):
        for r in result["methods"]:
            s = r["telemetry"]
            lines.append(f"telemetry {r['name']}: " + ", ".join(
                f"{k} {s[k]['mean']:.0f} (max {s[k]['max']:.0f})" for k in TELEMETRY_FIELDS if s.get(k)))
    else:
        lines.append(f"GPU telemetry: {result['telemetry']['reason']}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Images/s per variant: measured (with the IQR over repeats) beside the FLOP-predicted bar."""
    rows = result["methods"]
    base = next(r for r in rows if r["method"] == "baseline")
    ips = [r["img_per_s"] for r in rows]
    err = [[q["median"] - q["q25"] for q in ips], [q["q75"] - q["median"] for q in ips]]
    x = range(len(rows))
    with figure(path, figsize=(1.6 * len(rows) + 2, 4.2)) as (_, ax):
        ax.bar([i - 0.2 for i in x], [q["median"] for q in ips], 0.4, yerr=err, capsize=3,
               label="measured (median, IQR)")
        ax.bar([i + 0.2 for i in x], [base["img_per_s"]["median"] / r["flop_ratio"] for r in rows], 0.4,
               alpha=0.6, label="FLOP-predicted from the baseline")
        ax.set_xticks(list(x), [r["name"] for r in rows])
        ax.set_ylabel("training images / s")
        c = result["config"]
        ax.set_title(f"{c['arch']} @ {c['image_size']}px, batch {c['batch_size']}, {c['precision']}, "
                     f"{result['environment']['device_name']}", fontsize=9)
        ax.legend(fontsize=8)
