"""One-command GPU acceptance check: what the CPU-only development machines cannot verify.

    python -m benchmarks.gpu_check --out DIR [--parts setup,cuda_tests] [--list]

The parts (PARTS) run in order, each forked into its own process group under its own time limit; the parent
imports neither torch nor the project, so the parts after `setup` load the library it has just built.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TOTAL_LIMIT_S = 450.0  # within the 8 minutes promised on one H100-class GPU, probe included
MIN_PART_S = 20.0  # a part that would get less is skipped
PROBE_LIMIT_S = 60.0
NO_NETWORK = {"PIP_NO_INDEX": "1", "PYTHONUNBUFFERED": "1"}
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class PartFailed(Exception):
    """The part ran and failed; the message is its one-line report."""


@dataclass(frozen=True)
class Context:
    out: Path
    device: dict[str, Any]  # the probe's report


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Context], dict[str, Any]]  # -> {"status": "passed"|"measured", "summary": ..., details}
    limit_s: float
    what: str


# --- running a part in its own process group ---------------------------------------------------------


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _child(fn: Callable[[Context], dict], ctx: Context, conn) -> None:
    os.setsid()  # its own group: a timeout kills it and everything it started
    try:
        result = fn(ctx)
    except PartFailed as err:
        result = {"status": "failed", "summary": str(err)}
    except BaseException as err:  # noqa: BLE001 - any error is this part's failure, reported in one line
        result = {"status": "failed", "summary": f"{type(err).__name__}: {err}"}
    result["summary"] = _one_line(result.get("summary", ""))
    conn.send(result)
    conn.close()


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # no group yet (killed before its setsid) or none left
        proc.kill()


def run_limited(fn: Callable[[Context], dict], ctx: Context, limit_s: float) -> dict[str, Any]:
    """fn(ctx) in a forked child, killed with its whole process group after limit_s seconds."""
    mp = multiprocessing.get_context("fork")
    receiver, sender = mp.Pipe(duplex=False)
    proc = mp.Process(target=_child, args=(fn, ctx, sender))
    start = time.monotonic()
    proc.start()
    sender.close()
    try:
        if receiver.poll(limit_s):
            try:
                result = receiver.recv()
            except EOFError:
                proc.join(5)
                result = {"status": "failed", "summary": f"its process died (exit code {proc.exitcode})"}
        else:
            result = {"status": "failed", "summary": f"timed out after {limit_s:.0f} s (its time limit)"}
    finally:
        _kill_group(proc)  # leftovers of a finished part, or the whole part on a timeout
        proc.join(5)
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def sh(args: Sequence[str], log: Path, **env: str) -> int:
    """Run a command from the repository root, appending its output to `log`; its exit status."""
    with log.open("a") as f:
        f.write(f"$ {shlex.join(args)}\n")
        f.flush()
        return subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **NO_NETWORK, **env}).returncode


def last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return _one_line(lines[-1]) if lines else "(no output)"


# --- the parts ---------------------------------------------------------------------------------------


def probe(ctx: Context) -> dict[str, Any]:  # noqa: ARG001 - the part signature
    """Whether a CUDA GPU is visible; its name and capability, and the software around it."""
    import torch

    from benchmarks.common import environment

    if not torch.cuda.is_available():
        return {"status": "passed", "cuda": False, "summary": f"no CUDA GPU, torch {torch.__version__}",
                "environment": environment("cpu")}
    from torch.utils.cpp_extension import is_ninja_available

    props = torch.cuda.get_device_properties(0)
    return {"status": "passed", "cuda": True, "capability": [props.major, props.minor],
            "summary": f"{props.name}, compute capability {props.major}.{props.minor}, "
                       f"{props.total_memory / 2**30:.0f} GiB, torch {torch.__version__} (CUDA {torch.version.cuda})",
            "gpus": torch.cuda.device_count(), "environment": environment("cuda"),
            "ninja": is_ninja_available(), "nvcc_on_path": shutil.which("nvcc")}  # without ninja the build is serial


def setup_part(ctx: Context) -> dict[str, Any]:
    """setup.py build_ext --inplace for this GPU's capability only: quick, and no pip, so nothing is
    fetched or installed; a missing nvcc or a failed CUDA build is an error, not a CPU-only build."""
    major, minor = ctx.device["capability"]
    log = ctx.out / "setup.log"
    start = time.monotonic()
    rc = sh([PY, "setup.py", "build_ext", "--inplace"], log, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}",
            DHM_FAST_REQUIRE_CUDA_BUILD="1", MAX_JOBS=str(os.cpu_count() or 4))
    if rc:
        raise PartFailed(f"the build failed (exit {rc}): {last_line(log)}; see {log}")
    seconds = time.monotonic() - start
    import kernels

    targets = list(kernels.built_cuda_targets())
    if not kernels.has_kernel("fused_loss", "cuda"):
        raise PartFailed(f"built, but the fused op cannot run on this GPU (targets {targets}, "
                         f"load error {kernels.load_error()})")
    return {"status": "passed", "targets": targets, "build_seconds": round(seconds),
            "summary": f"built kernels._C for {', '.join(targets)} in {seconds:.0f} s; the fused op runs here"}


def cuda_tests_part(ctx: Context) -> dict[str, Any]:
    log = ctx.out / "cuda_tests.log"
    rc = sh([PY, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"], log)
    tally = re.findall(r"(\d+) (passed|failed|errors?|skipped)", last_line(log))
    counts = {word: int(n) for n, word in tally}
    summary = ", ".join(f"{n} {word}" for word, n in counts.items()) or last_line(log)
    if rc or not counts.get("passed"):
        raise PartFailed(f"pytest exit {rc}: {summary}; see {log}")
    return {"status": "passed", "summary": summary, "counts": counts}


def kernel_matrix_part(ctx: Context) -> dict[str, Any]:
    """The fused op's CUDA kernels on the agreement matrix (dhm_fast.kernel_agreement) against its CPU
    kernel on the same inputs: what tests/test_cuda_emu.py checks under the CUDA execution model on the
    CPU, here on the GPU, so one run confirms or refutes the model's verdict."""
    import kernels
    from dhm_fast import kernel_agreement

    op = kernels.op("fused_loss")
    rows = kernel_agreement.compare_ops(op, "cuda", op)
    (ctx.out / "kernel_matrix.json").write_text(json.dumps(rows, indent=2))
    bad = [r["case"] for r in rows if not r["agrees"]]
    summary = (f"{len(rows) - len(bad)}/{len(rows)} cases agree with the CPU op"
               + (f"; first disagreeing: {', '.join(bad[:3])}" if bad else ""))
    return {"status": "failed" if bad else "passed", "summary": summary, "cases": rows}


def summarise_loss_bench(results: dict[str, dict]) -> str:
    """One line from bench_loss's JSON per dtype: the fused op's best bytes/s and share of peak bandwidth."""
    def one(rows: list[dict]) -> str:
        best = max((r for r in rows if "fused_bytes_per_s" in r), key=lambda r: r["fused_bytes_per_s"], default=None)
        if best is None:
            return "no fused timing"
        frac = best.get("fused_bandwidth_fraction")
        return (f"{best['fused_bytes_per_s'] / 1e9:.0f} GB/s" + (f" = {100 * frac:.0f}% of peak" if frac else
                " (peak unknown)") + f" at H,B,K={best['H']},{best['B']},{best['K']}")

    return "fused op " + "; ".join(f"{dtype}: {one(data['rows'])}" for dtype, data in results.items())


def loss_bench_args(dtype: str, out: Path) -> list[str]:
    return ["--device", "cuda", "--dtype", dtype, "--quick", "--no-compile", "--out", str(out)]


def benchmark_json(module: str, args: list[str], result: Path, log: Path) -> dict[str, Any]:
    """Run `python -m benchmarks.MODULE ARGS` and read the JSON it writes to `result` (before its figure,
    which may fail: the JSON counts)."""
    rc = sh([PY, "-m", f"benchmarks.{module}", *args], log)
    if not result.exists():
        raise PartFailed(f"benchmarks.{module} exit {rc}, no JSON: {last_line(log)}; see {log}")
    return json.loads(result.read_text())


def loss_bench_part(ctx: Context) -> dict[str, Any]:
    results = {dtype: benchmark_json("bench_loss", loss_bench_args(dtype, ctx.out / f"loss_bench_{dtype}"),
                                     ctx.out / f"loss_bench_{dtype}" / "loss_bench.json", ctx.out / "loss_bench.log")
               for dtype in ("float32", "bfloat16")}
    return {"status": "measured", "summary": summarise_loss_bench(results),
            "rows": {d: r["rows"] for d, r in results.items()}}


THROUGHPUT_ARGS = ["--arch", "resnet50", "--image-size", "224", "--batch-size", "256", "--precision", "bf16",
                   "--channels-last", "--methods", "baseline,dhm", "--warmup", "3", "--steps", "5", "--repeats", "3"]


def summarise_throughput(data: dict[str, Any]) -> str:
    rows = {r["name"]: r for r in data["methods"]}
    dhm, base = rows["dhm"], rows["baseline"]
    target = data.get("targets", {}).get("dhm_time_over_flop_ratio", {}).get("target")
    return (f"DHM/baseline step time {dhm['time_ratio']['median']:.2f}x vs FLOPs {dhm['flop_ratio']:.2f}x "
            f"(time/FLOP {dhm['time_over_flop_ratio']:.2f}" + (f", target <= {target:.2f}" if target else "")
            + f"); baseline {base['img_per_s']['median']:.0f} img/s, DHM {dhm['img_per_s']['median']:.0f} img/s")


def throughput_part(ctx: Context) -> dict[str, Any]:
    result = ctx.out / "throughput" / "throughput.json"
    data = benchmark_json("throughput", [*THROUGHPUT_ARGS, "--device", "cuda", "--out", str(result.parent)], result,
                          ctx.out / "throughput.log")
    return {"status": "measured", "summary": summarise_throughput(data), "json": str(result)}


def kill_and_resume(cmd: list[str], out: Path, log: Path, poll_s: float = 0.05) -> dict[str, Any]:
    """Start the training command, SIGKILL it once its first checkpoint exists, run it again: the second
    run must say it resumed and finish (summary.json, not stopped early)."""
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}  (killed after its first checkpoint)\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **NO_NETWORK})
        while proc.poll() is None and not (out / "last.pt").exists():
            time.sleep(poll_s)
        proc.kill()
        proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise PartFailed(f"the first run ended (exit {proc.returncode}) before it could be killed at a "
                         f"checkpoint: {last_line(log)}")
    mark = log.stat().st_size
    rc = sh(cmd, log)
    second = log.read_text(errors="replace")[mark:]
    resumed = re.search(r"resumed from \S+ at epoch \d+, step (\d+)", second)
    summary_file = out / "summary.json"
    if rc or not resumed or not summary_file.exists():
        raise PartFailed(f"the second run (exit {rc}) " + ("did not resume" if not resumed else "did not finish")
                         + f": {last_line(log)}")
    done = json.loads(summary_file.read_text())
    if done.get("stopped_early"):
        raise PartFailed("the resumed run stopped early")
    top1 = (done.get("final") or {}).get("heads", {}).get("main", {}).get("top1")
    chosen = [ln for ln in second.splitlines() if ln.startswith(("--amp", "channels-last"))]  # the GPU defaults
    return {"status": "passed", "resumed_at_step": int(resumed.group(1)), "steps": done.get("steps"), "chosen": chosen,
            "summary": f"killed after its first checkpoint, resumed at step {resumed.group(1)}, finished "
                       f"{done.get('epochs_done')} epochs ({done.get('steps')} steps)"
                       + (f", val top-1 {top1:.2f}%" if isinstance(top1, float) else "")}


def train_args(out: Path) -> list[str]:
    """The default recipe (ResNet-20, DHM, Fashion-MNIST; without the data set, ResNet-18 on synthetic
    224 px batches) with the trainer's GPU defaults, two epochs, a checkpoint every 20 steps."""
    args = ["--device", "cuda", "--out", str(out), "--epochs", "2", "--save-every-steps", "20",
            "--log-every-steps", "20"]
    return args if FASHION_MNIST.is_dir() else [*args, "--loader", "synthetic", "--arch", "resnet18"]


def train_resume_part(ctx: Context) -> dict[str, Any]:
    out = ctx.out / "train_resume"
    shutil.rmtree(out, ignore_errors=True)
    result = kill_and_resume([PY, "train.py", *train_args(out)], out, ctx.out / "train_resume.log")
    from dhm_fast.logbook import read_log

    result["gpu_telemetry_logged"] = any("gpus" in r for r in read_log(out, kind=None))  # NVML reached the log
    result["summary"] += "; GPU telemetry in log.jsonl" if result["gpu_telemetry_logged"] else "; no GPU telemetry"
    return result


def backbone_args(out: Path) -> list[str]:
    """A torchvision backbone with generic branches under the trainer's GPU defaults (autocast,
    channels-last), on synthetic 224 px batches."""
    return ["--arch", "tv:resnet18", "--loader", "synthetic", "--device", "cuda", "--max-steps", "20",
            "--log-every-steps", "10", "--out", str(out)]


def backbone_export_part(ctx: Context) -> dict[str, Any]:
    """Train tv:resnet18 with DHM for 20 steps, then export it: the exporter itself checks that the stock
    torchvision constructor, loaded from the written files, reproduces the trained trunk's outputs."""
    out, log = ctx.out / "backbone", ctx.out / "backbone_export.log"
    shutil.rmtree(out, ignore_errors=True)
    if rc := sh([PY, "train.py", *backbone_args(out)], log):
        raise PartFailed(f"training exit {rc}: {last_line(log)}")
    if rc := sh([PY, "-m", "dhm_fast.export", str(out / "last.pt"), "--out", str(out / "export")], log):
        raise PartFailed(f"export exit {rc}: {last_line(log)}")
    return {"status": "passed", "summary": last_line(log)}


PARTS = (
    Part("setup", setup_part, 240, "build kernels._C in place for this GPU (no network)"),
    Part("kernel_matrix", kernel_matrix_part, 60, "the CUDA kernels vs the CPU op on the agreement matrix"),
    Part("cuda_tests", cuda_tests_part, 100, "pytest -m cuda"),
    Part("loss_bench", loss_bench_part, 75, "benchmarks.bench_loss on the GPU: bytes/s vs memory bandwidth"),
    Part("throughput", throughput_part, 120, "resnet50 224 bf16 channels_last, baseline vs DHM: time vs FLOPs"),
    Part("train_resume", train_resume_part, 100, "train.py on the GPU, SIGKILLed at a checkpoint, resumed"),
    Part("backbone_export", backbone_export_part, 90, "tv:resnet18 + DHM, 20 steps on the GPU, then exported"),
)


# --- the run and its report --------------------------------------------------------------------------


def run_check(parts: Sequence[Part], out: Path, probe_fn: Callable[[Context], dict] = probe,
              total_limit_s: float = TOTAL_LIMIT_S) -> dict[str, Any]:
    """Probe the device, then run each part under min(its limit, what is left of the total)."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    device = run_limited(probe_fn, Context(out, {}), PROBE_LIMIT_S)
    ctx = Context(out, device)
    results: dict[str, dict[str, Any]] = {}
    for part in parts:
        left = total_limit_s - (time.monotonic() - start)
        if device["status"] == "failed":
            results[part.name] = {"status": "skipped", "summary": f"the device probe failed: {device['summary']}"}
        elif not device.get("cuda"):
            results[part.name] = {"status": "skipped", "summary": "no CUDA GPU"}
        elif left < MIN_PART_S:
            results[part.name] = {"status": "skipped", "summary": f"the {total_limit_s:.0f} s budget is spent"}
        else:
            limit = min(part.limit_s, left)
            print(f"gpu_check: {part.name}: {part.what} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
            results[part.name] = {**run_limited(part.run, ctx, limit), "limit_s": round(limit)}
            print(f"gpu_check: {part.name}: {results[part.name]['status']}", file=sys.stderr, flush=True)
    return {"schema": "dhm_fast/gpu_check/1", "ran_on_gpu": bool(device.get("cuda")), "device": device,
            "total_seconds": round(time.monotonic() - start, 1), "parts": results}


def format_table(report: dict[str, Any]) -> str:
    """The one table: a title line with the device, then per part its time and `status (summary)`."""
    parts = report["parts"]
    counts = {s: sum(r["status"] == s for r in parts.values()) for s in ("passed", "measured", "failed", "skipped")}
    lines = [f"GPU acceptance check ({report['device'].get('summary', '?')}): "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n), f"{'part':<15} {'time':>7}  result"]
    for name, r in parts.items():
        secs = f"{r['seconds']:.0f} s" if "seconds" in r else "-"
        lines.append(f"{name:<15} {secs:>7}  {r['status']} ({r.get('summary', '')})")
    return "\n".join(lines)


def select_parts(text: str) -> list[Part]:
    """--parts "a,b" -> those parts in the check's order; an unknown name is a ValueError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = [p.name for p in PARTS]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown part {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return [p for p in PARTS if p.name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out/gpu_check"), help="folder for JSON and logs")
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS), help="comma-separated subset")
    parser.add_argument("--list", action="store_true", help="list the parts and exit")
    args = parser.parse_args(argv)
    try:
        parts = select_parts(args.parts)
    except ValueError as err:
        print(f"error: --parts: {err}", file=sys.stderr)
        return 2
    if args.list:
        for p in parts:
            print(f"{p.name:<15} {p.limit_s:>4.0f} s  {p.what}")
        return 0
    out = args.out.resolve()
    if out.exists() and not out.is_dir():  # benchmarks.common has this check, but it imports torch
        print(f"error: --out {args.out} is a file, not a folder", file=sys.stderr)
        return 2
    report = run_check(parts, out)
    report["command"] = shlex.join(["python", "-m", "benchmarks.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"wrote {args.out / 'gpu_check.json'}")
    failed = report["device"]["status"] == "failed" or any(r["status"] == "failed" for r in report["parts"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
