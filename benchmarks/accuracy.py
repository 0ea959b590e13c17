"""Accuracy on a short schedule: baseline, DSL, DHM as released, and DHM with an alpha warm-up.

    python -m benchmarks.accuracy [--quick] [--jobs 2] [--variants baseline,dsl,dhm,dhm-warmup] [--seeds N|a,b]

Every run is `python train.py ...` in a subprocess writing into <runs>/<name>/<variant>/seed<k> (reused
when finished, resumed when interrupted); <results>/accuracy-<name>.json, .md and .png are rewritten after
every run. The protocol and the figures: docs/short_schedules.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import ROOT, check, cli, command_line, environment, figure, option, parse_settings
from dhm_fast.logbook import read_log

RECIPE = "fashion-mnist-resnet20-short"

# DHM flags spelled out in full so that no recipe default leaks into a variant.
_DHM = "--method dhm --alpha 1 --temperature 1 --direction both --branch-prob 1"

# name: (what it is, train.py flags). The result files also keep the runs of variants studied once and
# since removed (docs/short_schedules.md), each with its description and exact train.py command.
VARIANTS: dict[str, tuple[str, str]] = {
    "baseline": ("main head only", "--method baseline"),
    "dsl": ("deep supervision: CE on every head, no KL", "--method dsl"),
    "dhm": ("DHM as released: alpha = 1 from the first step", f"{_DHM} --alpha-ramp constant"),
    "dhm-warmup": ("DHM, alpha ramped linearly 0 -> 1 over the first half",
                   f"{_DHM} --alpha-ramp linear --alpha-ramp-epochs 0.5"),
}


@dataclass
class AccuracyConfig:
    quick: bool = option(False, "smoke version: 2 epochs on 2,048 images, 1 seed")
    variants: str = option(",".join(VARIANTS), "comma-separated variants")
    seeds: str = option("3", "a count N (seeds 0..N-1) or a comma-separated list ('3,4'; '0,' for seed 0 alone)")
    epochs: int = option(8, ge=1)
    milestones: str | None = option(None, "lr x0.1 epochs (default: half and three quarters)")
    train_subset: int = option(10000, ge=128)
    amp: str = option("bf16", choices=("none", "bf16"))
    recipe: str = option(RECIPE, "base recipe; the flags above override it")
    extra: str = option("", "more train.py flags for every run, e.g. '--no-channels-last'")
    threads: int = option(1, "CPU threads per run", ge=1)
    jobs: int = option(1, "runs at the same time", ge=1)
    name: str | None = option(None, "results name (default e<epochs>-n<subset>-<amp>, or 'quick')")
    runs: Path = option(Path("runs/accuracy"), "run folders (relative paths are under the repository root)")
    results: Path = option(Path("benchmarks/results"), "JSON/MD/PNG folder (relative: under the repository root)")

    @property
    def milestone_list(self) -> list[float]:
        if self.milestones:
            return [float(x) for x in self.milestones.split(",") if x.strip()]
        return sorted({float(m) for m in (round(self.epochs / 2), round(3 * self.epochs / 4)) if 0 < m < self.epochs})

    @property
    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in self.seeds.split(",") if s.strip()] if "," in self.seeds else \
                list(range(int(self.seeds)))
        except ValueError:
            raise ValueError(f"--seeds: expected a count or a comma-separated list, got {self.seeds!r}") from None
        if not seeds:
            raise ValueError("--seeds: no seed to run (a single number is a count; for seed 0 alone pass '0,')")
        return seeds

    @property
    def variant_list(self) -> list[str]:
        names = [v.strip() for v in self.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
        return list(dict.fromkeys(names))

    def folder(self, path: Path) -> Path:
        return path if path.is_absolute() else ROOT / path


def parse_args(argv: list[str] | None) -> AccuracyConfig:
    """The settings with --quick applied; bad values raise ValueError (seeds and variants when first read)."""
    args = parse_settings(AccuracyConfig, "benchmarks.accuracy", __doc__, argv)
    if args.quick:
        args.epochs, args.train_subset = 2, 2048
        args.seeds = "1" if args.seeds == "3" else args.seeds
    check(args)
    if not args.name:
        args.name = "quick" if args.quick else f"e{args.epochs}-n{args.train_subset}-{args.amp}"
        if args.extra:  # other flags, another protocol: keep its runs apart
            args.name += "-x" + hashlib.sha1(args.extra.encode()).hexdigest()[:8]
    return args


# ---------------------------------------------------------------------------- one run
def train_command(args: AccuracyConfig, variant: str, seed: int, out: Path) -> list[str]:
    cmd = ["train.py", "--recipe", args.recipe, "--epochs", str(args.epochs),
           "--milestones", ",".join(_num(m) for m in args.milestone_list),
           "--train-subset", str(args.train_subset), "--amp", args.amp, "--loader", "memory",
           "--seed", str(seed)]
    return cmd + shlex.split(VARIANTS[variant][1]) + shlex.split(args.extra) + ["--out", str(out)]


def _finished(out: Path) -> bool:
    summary = out / "summary.json"
    return summary.is_file() and not json.loads(summary.read_text())["stopped_early"]


def run_once(args: AccuracyConfig, variant: str, seed: int, bench_command: str) -> dict:
    """Train one (variant, seed), or reuse a finished run of the same command; return its record."""
    rel = args.runs / args.name / variant / f"seed{seed}"  # as train.py sees it (cwd: the repository)
    cmd, out = train_command(args, variant, seed, rel), args.folder(rel)
    stamp = out / "bench_command.json"
    if stamp.is_file() and json.loads(stamp.read_text())["command"] != cmd:
        raise SystemExit(f"{out} holds a run of another command; pass another --name or remove it")
    done = _finished(out)
    if not done:
        out.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file():
            stamp.write_text(json.dumps({"command": cmd, "benchmark": bench_command}))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        t0 = time.perf_counter()
        with open(out / "train_output.txt", "a") as f:
            proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            return {"variant": variant, "seed": seed, "error": f"exit code {proc.returncode}, see "
                    f"{out / 'train_output.txt'}", "command": shlex.join(cmd)}
        (out / "bench_wall.json").write_text(json.dumps({"wall_seconds": time.perf_counter() - t0}))
    return {**read_run(out, variant, seed), "reused": done}


def read_run(out: Path, variant: str, seed: int) -> dict:
    stamp = json.loads((out / "bench_command.json").read_text())
    log = read_log(out, kind="epoch")
    wall_file = out / "bench_wall.json"
    top1 = [r["val"]["heads"]["main"]["top1"] for r in log]
    return {
        "variant": variant, "seed": seed, "command": shlex.join(stamp["command"]),
        "benchmark_command": stamp.get("benchmark"), "epochs": len(log), "main_top1": top1[-1],
        "heads_top1": {h: v["top1"] for h, v in log[-1]["val"]["heads"].items()},
        "best_main_top1": max(top1), "curve_main_top1": top1, "curve_alpha": [r["alpha"] for r in log],
        "curve_mean_kl": [statistics.fmean(r["train"]["kl"].values()) if r["train"]["kl"] else None for r in log],
        "train_seconds": sum(r["train_seconds"] for r in log),
        "wall_seconds": json.loads(wall_file.read_text())["wall_seconds"] if wall_file.is_file() else None,
    }


# ---------------------------------------------------------------------------- aggregation
def aggregate(records: list[dict], variants: list[str], known: dict[str, tuple[str, str]]) -> dict[str, dict]:
    table = {}
    for v in variants:
        ok = sorted((r for r in records if r["variant"] == v and "error" not in r), key=lambda r: r["seed"])
        accs = [r["main_top1"] for r in ok]
        walls = [r["wall_seconds"] / 60 for r in ok if r["wall_seconds"]]
        heads = ok[0]["heads_top1"] if ok else {}
        table[v] = {
            "description": known[v][0], "flags": known[v][1], "n": len(accs),
            "seeds": [r["seed"] for r in ok], "main_top1": accs,
            "mean": statistics.fmean(accs) if accs else None,
            "std": statistics.stdev(accs) if len(accs) > 1 else None,
            "heads_mean": {h: statistics.fmean(r["heads_top1"][h] for r in ok) for h in heads},
            "minutes_per_run": statistics.fmean(walls) if walls else None,
            "errors": [r["error"] for r in records if r["variant"] == v and "error" in r],
        }
    return table


def collect_finished(args: AccuracyConfig) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """Every finished run under <runs>/<name>, whichever invocation trained it, so that invocations sharing
    a name make one table; runs recorded in the results JSON whose folders are gone (trained on another
    machine) are kept, a folder's record replacing the recorded one. Also (description, flags) of every
    variant these runs belong to."""
    found, known = {}, dict(VARIANTS)
    previous = args.folder(args.results) / f"accuracy-{args.name}.json"
    if previous.is_file():
        data = json.loads(previous.read_text())
        known = {**{v: (t["description"], t["flags"]) for v, t in data["variants"].items()}, **VARIANTS}
        found = {(r["variant"], r["seed"]): r for r in data["runs"] if "error" not in r}
    for out in sorted((args.folder(args.runs) / args.name).glob("*/seed*")):
        if out.parent.name in known and (out / "bench_command.json").is_file() and _finished(out):
            seed = int(out.name.removeprefix("seed"))
            found[out.parent.name, seed] = read_run(out, out.parent.name, seed)
    return list(found.values()), known


def write_results(args: AccuracyConfig, errors: list[dict], command: str) -> Path:
    finished, known = collect_finished(args)
    records = finished + errors
    present = {r["variant"] for r in records} | set(args.variant_list)
    variants = [v for v in dict.fromkeys([*VARIANTS, *known]) if v in present]  # a stable order
    base = args.folder(args.results) / f"accuracy-{args.name}"
    base.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "protocol": {"recipe": args.recipe, "arch": "resnet20", "dataset": "fashion-mnist",
                     "train_subset": args.train_subset, "test_images": 10000, "epochs": args.epochs,
                     "milestones": args.milestone_list, "amp": args.amp, "extra": args.extra,
                     "score": "main-head test top-1 after the last epoch"},
        "variants": aggregate(records, variants, known),
        "benchmark_commands": sorted({r["benchmark_command"] for r in records if r.get("benchmark_command")}),
        "runs": sorted(records, key=lambda r: (variants.index(r["variant"]), r["seed"])),
        "machine": {**environment(), "threads_per_run": args.threads, "jobs": args.jobs},
    }
    base.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    base.with_suffix(".md").write_text(markdown(payload))
    plot(payload, base.with_suffix(".png"))
    return base


def _fmt(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def markdown(payload: dict) -> str:
    p = payload["protocol"]
    lines = [
        f"Protocol: {p['arch']} on {p['train_subset']:,} {p['dataset']} training images (a fixed random subset), "
        f"test on all {p['test_images']:,}; {p['epochs']} epochs, "
        f"lr x0.1 at epochs {', '.join(map(_num, p['milestones'])) or '(none)'}; "
        f"amp {p['amp']}{'; extra flags ' + p['extra'] if p['extra'] else ''}. Score: {p['score']} (%).",
        "",
        "Produced by: " + "; ".join(f"`{c}`" for c in payload["benchmark_commands"] or [payload["command"]]),
        "",
        "| variant | what | runs | main top-1 mean ± std | per seed | aux1 / aux2 mean | min/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in payload["variants"].items():
        per_seed = " / ".join(f"{a:.2f}" for a in v["main_top1"]) or "-"
        aux = " / ".join(f"{v['heads_mean'][h]:.2f}" for h in ("aux1", "aux2") if h in v["heads_mean"]) or "-"
        minutes = f"{v['minutes_per_run']:.1f}" if v["minutes_per_run"] else "-"
        lines.append(f"| {name} | {v['description']} | {v['n']} | {_fmt(v['mean'], v['std'])} | {per_seed} "
                     f"| {aux} | {minutes} |")
    errors = [e for v in payload["variants"].values() for e in v["errors"]]
    if errors:
        lines += ["", "Failed runs: " + "; ".join(errors)]
    first: dict[str, str] = {}  # variant -> the command of its first run
    for r in payload["runs"]:
        first.setdefault(r["variant"], f"python {r['command']}")
    return "\n".join([*lines, "", "One run of each variant (seed 0):", "", "```", *first.values(), "```", ""])


def plot(payload: dict, path: Path) -> None:
    variants = {k: v for k, v in payload["variants"].items() if v["n"]}
    if not variants:
        return
    with figure(path, dpi=90, ncols=3, figsize=(16, 0.5 * len(variants) + 3.5)) as (fig, (ax_acc, ax_curve, ax_kl)):
        import matplotlib

        cmap = matplotlib.colormaps["tab10" if len(variants) <= 10 else "tab20"]
        for y, (name, v) in enumerate(variants.items()):
            color = cmap(y % cmap.N)  # one colour per variant in every panel
            ax_acc.scatter(v["main_top1"], [y] * v["n"], color="tab:gray", s=18, zorder=2)
            ax_acc.errorbar(v["mean"], y, xerr=v["std"] or 0, fmt="o", color=color, capsize=4, zorder=3)
            ax_acc.annotate(_fmt(v["mean"], v["std"]), (v["mean"], y), textcoords="offset points", xytext=(0, 7),
                            ha="center", fontsize=8)
            runs = [r for r in payload["runs"] if r["variant"] == name and "error" not in r]
            n_ep = min(len(r["curve_main_top1"]) for r in runs)
            epochs = range(1, n_ep + 1)
            ax_curve.plot(epochs, [statistics.fmean(r["curve_main_top1"][e] for r in runs) for e in range(n_ep)],
                          marker=".", label=name, color=color)
            kls = [r["curve_mean_kl"] for r in runs if r["curve_mean_kl"][0] is not None]
            if kls:  # geometric mean over seeds: the KL spans decades
                ax_kl.plot(epochs, [math.exp(statistics.fmean(math.log(max(c[e], 1e-12)) for c in kls))
                                    for e in range(n_ep)], marker=".", label=name, color=color)
        ax_acc.set_yticks(range(len(variants)), list(variants))
        ax_acc.invert_yaxis()
        ax_acc.set(title="main-head test top-1 after the last epoch (%)", xlabel="top-1 %")
        ax_acc.grid(alpha=0.3, axis="x")
        ax_curve.set(title="main-head test top-1 per epoch (mean over seeds)", xlabel="epoch", ylabel="top-1 %")
        ax_kl.set(title="mean pairwise train KL per epoch (heads agreeing)", xlabel="epoch", yscale="log")
        for ax in (ax_curve, ax_kl):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        p = payload["protocol"]
        fig.suptitle(f"{p['arch']} / {p['dataset']}, {p['train_subset']:,} training images / {p['epochs']} epochs / "
                     f"amp {p['amp']}")


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    return cli(lambda: benchmark(parse_args(argv), argv))


def benchmark(args: AccuracyConfig, argv: list[str] | None) -> None:
    jobs = [(v, s) for s in args.seed_list for v in args.variant_list]  # seed-major: every variant early
    command = command_line("benchmarks.accuracy", argv)
    print(f"command: {command}\n{len(jobs)} runs ({', '.join(args.variant_list)} x seeds {args.seed_list}), "
          f"{args.jobs} at a time, {args.threads} thread(s) each; runs in {args.runs / args.name}", flush=True)
    records: list[dict] = []
    lock = threading.Lock()

    def one(job: tuple[str, int]) -> None:
        record = run_once(args, *job, command)
        with lock:
            records.append(record)
            write_results(args, [r for r in records if "error" in r], command)
            status = record.get("error") or (f"main top-1 {record['main_top1']:.2f}%"
                                             + (" (reused)" if record["reused"] or not record["wall_seconds"]
                                                else f" in {record['wall_seconds'] / 60:.1f} min"))
            print(f"[{len(records)}/{len(jobs)}] {job[0]} seed {job[1]}: {status}", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, jobs))
    base = write_results(args, [r for r in records if "error" in r], command)
    print(base.with_suffix(".md").read_text())
    print(f"wrote {base}.json, .md and .png")


if __name__ == "__main__":
    sys.exit(main())
