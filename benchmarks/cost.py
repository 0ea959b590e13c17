"""What a training run costs: wall-clock and device-hours from images/s, devices and a recipe.

    python -m benchmarks.cost --img-per-s 1200 --devices 8 --efficiency 0.9 \\
        --recipe imagenet-resnet152 --method dhm
    python -m benchmarks.cost --from-json bench_out/throughput/throughput.json --method dhm \\
        --recipe cifar100-resnet32
    python -m benchmarks.cost --recipe imagenet-resnet152 --method dhm --gpu-table
    python -m benchmarks.cost --budget-table

Aggregate images/s = per-device images/s x devices x scaling efficiency; wall-clock = epochs x
training-set size / aggregate; device-hours = wall-clock x devices (evaluation, start-up and
checkpoints not included). --gpu-table scales published ResNet-50 figures by training FLOPs: an
estimate, not a measurement (docs/benchmarks.md). --budget-table does the same for the ImageNet budget
recipes, epoch by epoch at each epoch's resolution, next to the paper's recipes (docs/imagenet.md).
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.common import cli, option, parse_settings
from benchmarks.throughput_report import SCHEMA

# Training-set sizes (images per epoch).
DATASET_SIZES = {"imagenet": 1_281_167, "cifar10": 50_000, "cifar100": 50_000, "fashion-mnist": 60_000}
# (classes, input channels, native resolution or None for the recipe's image_size)
DATASET_SHAPES = {"imagenet": (1000, 3, None), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32),
                  "fashion-mnist": (10, 1, 28)}

_NVIDIA_DLE = ("NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "
               "'Training performance results' (pytorch-21.03 NGC container)")


class GpuFigure(NamedTuple):
    """ResNet-50 (v1.5, 224 px) training images/s on one GPU, and on 8 when published."""

    gpu: str
    precision: str
    img_per_s: float
    img_per_s_8: float | None
    source: str
    published: bool  # False: an assumption, not a published measurement


GPU_FIGURES: tuple[GpuFigure, ...] = (
    GpuFigure("V100 16GB", "FP32", 367, 2855, _NVIDIA_DLE + ", DGX-1 16GB table", True),
    GpuFigure("V100 16GB", "AMP", 1200, 8322, _NVIDIA_DLE + ", DGX-1 16GB table", True),
    GpuFigure("V100 32GB", "AMP", 1156, 8056, _NVIDIA_DLE + ", DGX-1 32GB table", True),
    GpuFigure("A100 80GB", "TF32", 938, 7248, _NVIDIA_DLE + ", DGX A100 table", True),
    GpuFigure("A100 80GB", "AMP", 2470, 16621, _NVIDIA_DLE + ", DGX A100 table", True),
    GpuFigure("H100 80GB", "AMP", 2 * 2470, None,
              "ASSUMPTION: 2x the A100 80GB AMP figure; no published PyTorch ResNet-50 training "
              "images/s for H100 was found in that source", False),
)
REFERENCE_ARCH, REFERENCE_SIZE = "resnet50", 224  # what the published figures measured
BUDGET_GPU = ("A100 80GB", "AMP")  # the published 8-GPU figure the budget table scales
PAPER_RECIPES = ("imagenet-resnet50", "imagenet-resnet152")
# Published: ffcv-imagenet's README, configuration table (ResNet-50 on 8 x A100): epochs -> (top-1, minutes).
# Its recipe is close to our budget recipes, not equal (it adds blur-pool, test-time flips, a linear lr decay).
FFCV_RESNET50 = {16: (73.8, 14.9), 24: (75.6, 21.7), 32: (76.6, 28.7), 40: (77.2, 35.6), 56: (78.0, 49.4),
                 88: (78.4, 77.2)}


@dataclass(frozen=True)
class Estimate:
    img_per_s_per_device: float
    devices: int
    efficiency: float
    aggregate_img_per_s: float
    epochs: float
    dataset_size: int
    images: float
    wall_seconds: float
    wall_hours: float
    device_hours: float
    price_per_device_hour: float | None
    cost: float | None


def estimate(img_per_s: float, devices: int, epochs: float, dataset_size: int,
             efficiency: float | None = None, price_per_device_hour: float | None = None) -> Estimate:
    """Wall-clock and device-hours of `epochs` passes over `dataset_size` images.

    `efficiency` is the multi-device scaling efficiency (aggregate / (devices x single-device
    throughput)); None means 1.0 on one device and 0.9 on several.
    """
    if img_per_s <= 0:
        raise ValueError(f"images/s must be positive, got {img_per_s}")
    if devices < 1:
        raise ValueError(f"--devices must be at least 1, got {devices}")
    if epochs <= 0 or dataset_size < 1:
        raise ValueError(f"epochs and dataset size must be positive, got {epochs} and {dataset_size}")
    if efficiency is None:
        efficiency = 1.0 if devices == 1 else 0.9
    if not 0 < efficiency <= 1:
        raise ValueError(f"--efficiency must lie in (0, 1], got {efficiency}")
    if price_per_device_hour is not None and price_per_device_hour < 0:
        raise ValueError(f"--price must be >= 0, got {price_per_device_hour}")
    aggregate, images = img_per_s * devices * efficiency, epochs * dataset_size
    seconds = images / aggregate
    device_hours = seconds / 3600 * devices
    cost = device_hours * price_per_device_hour if price_per_device_hour is not None else None
    return Estimate(img_per_s, devices, efficiency, aggregate, epochs, dataset_size, images, seconds, seconds / 3600,
                    device_hours, price_per_device_hour, cost)


def recipe_run(recipe: str) -> dict[str, Any]:
    """Arch, dataset, epochs, image size and training-set size of a recipe (dhm_fast/recipes)."""
    from dhm_fast.config import TrainConfig, load_recipe

    values = {**{k: getattr(TrainConfig(), k) for k in ("arch", "dataset", "epochs", "image_size")},
              **load_recipe(recipe)}
    size = values.get("train_subset") or DATASET_SIZES.get(values["dataset"])
    if size is None:
        raise ValueError(f"recipe {recipe!r}: unknown size of dataset {values['dataset']!r}; "
                         "pass --dataset-size")
    classes, channels, native = DATASET_SHAPES.get(values["dataset"], (1000, 3, None))
    return {"recipe": recipe, "arch": values["arch"], "dataset": values["dataset"],
            "epochs": values["epochs"], "dataset_size": int(size),
            "image_size": native or values["image_size"], "num_classes": classes, "in_channels": channels}


def gpu_table(run: dict[str, Any], method: str, branch_prob: float = 1.0,
              price: float | None = None) -> list[dict[str, Any]]:
    """Estimated cost of `run` with `method` on each GPU of GPU_FIGURES, on 1 and on 8 GPUs: their images/s
    divided by the training FLOPs per image of the recipe's network with `method` over ResNet-50's."""
    from benchmarks.flops import model_step_flops

    scale = (model_step_flops(run["arch"], method, run["image_size"], run["num_classes"], run["in_channels"],
                              branch_prob) / model_step_flops(REFERENCE_ARCH, "baseline", REFERENCE_SIZE, 1000))
    rows = []
    for g in GPU_FIGURES:
        ips = g.img_per_s / scale
        # The published 8-GPU figure gives that setup's measured scaling efficiency.
        eff8 = g.img_per_s_8 / (8 * g.img_per_s) if g.img_per_s_8 else 0.9
        one = estimate(ips, 1, run["epochs"], run["dataset_size"], 1.0, price)
        eight = estimate(ips, 8, run["epochs"], run["dataset_size"], eff8, price)
        rows.append({"gpu": g.gpu, "precision": g.precision, "resnet50_img_per_s": g.img_per_s,
                     "published": g.published, "source": g.source, "flop_scale": scale,
                     "est_img_per_s": ips, "efficiency_8": eff8, "one_gpu": asdict(one),
                     "eight_gpus": asdict(eight)})
    return rows


def epoch_sides(recipe: str) -> tuple[Any, list[int]]:
    """A recipe's validated config and its training side in each epoch (dhm_fast/resolution.py)."""
    from dhm_fast.config import build_config
    from dhm_fast.resolution import schedule_for

    cfg = build_config(recipe, {})
    schedule = schedule_for(cfg, cfg.image_size)
    return cfg, schedule.sides(cfg.epochs) if schedule else [cfg.image_size] * cfg.epochs


@functools.cache
def _imagenet_step_flops(arch: str, method: str, side: int) -> float:
    from benchmarks.flops import model_step_flops

    return model_step_flops(arch, method, side, 1000)


def budget_table(recipes: list[str] | None = None, methods: tuple[str, ...] = ("baseline", "dhm"),
                 step_flops=None) -> list[dict[str, Any]]:
    """Each recipe with each method on 8 GPUs of BUDGET_GPU: its training FLOPs, summed epoch by epoch at
    that epoch's side, over a ResNet-50 @ 224 step's, divided by the published 8-GPU images/s."""
    from dhm_fast.config import recipe_names

    gpu = next(g for g in GPU_FIGURES if (g.gpu, g.precision) == BUDGET_GPU)
    step_flops = step_flops or _imagenet_step_flops  # (arch, method, side) -> training FLOPs per image
    reference = step_flops(REFERENCE_ARCH, "baseline", REFERENCE_SIZE)
    def budgets(paper: str) -> list[str]:
        found = [n for n in recipe_names() if n.startswith(paper + "-budget")]
        return sorted(found, key=lambda n: int(n.rsplit("budget", 1)[1]))

    rows = []
    for recipe in recipes or [r for paper in PAPER_RECIPES for r in (paper, *budgets(paper))]:
        cfg, sides = epoch_sides(recipe)
        for method in methods:
            work = sum(step_flops(cfg.arch, method, side) for side in sides) * DATASET_SIZES["imagenet"] / reference
            hours = work / gpu.img_per_s_8 / 3600
            ours_like_ffcv = "-budget" in recipe and cfg.arch == "resnet50" and method == "baseline"
            published = FFCV_RESNET50.get(cfg.epochs) if ours_like_ffcv else None
            rows.append({"recipe": recipe, "arch": cfg.arch, "method": method, "epochs": cfg.epochs,
                         "train_sides": sorted(set(sides)), "test_side": cfg.val_size or cfg.image_size,
                         "resnet50_224_images": work, "wall_hours": hours, "gpu_hours": 8 * hours,
                         "ffcv_published": {"top1": published[0], "minutes": published[1]} if published else None})
    return rows


def format_budget_table(rows: list[dict[str, Any]]) -> str:
    gpu = next(g for g in GPU_FIGURES if (g.gpu, g.precision) == BUDGET_GPU)
    lines = [f"FLOP-BASED ESTIMATES, not measurements: 8 x {gpu.gpu} {gpu.precision}, training FLOPs over ResNet-50 "
             f"@ 224's at the published {gpu.img_per_s_8:,.0f} img/s (evaluation and data loading not included); "
             "the accuracy of our budget recipes is unmeasured",
             f"{'recipe':<28}{'method':<10}{'epochs':>7}{'train px':>10}{'test px':>8}{'est. wall':>11}"
             f"{'est. GPU-h':>11}  published reference (ffcv-imagenet, ResNet-50, 8 x A100)"]
    for r in rows:
        sides = "-".join(str(s) for s in (r["train_sides"][0], r["train_sides"][-1])) if len(
            r["train_sides"]) > 1 else str(r["train_sides"][0])
        ref = r["ffcv_published"]
        lines.append(f"{r['recipe']:<28}{r['method']:<10}{r['epochs']:>7}{sides:>10}{r['test_side']:>8}"
                     f"{r['wall_hours']:>9.2f} h{r['gpu_hours']:>11.1f}"
                     + (f"  {ref['top1']:.1f}% top-1 in {ref['minutes']:.1f} min" if ref else ""))
    lines.append(f"Sources: {_NVIDIA_DLE}; ffcv-imagenet README, configuration table.")
    return "\n".join(lines)


def from_throughput_json(path: str, variant: str) -> tuple[float, dict[str, Any]]:
    """Images/s (median over repeats) of `variant` in a benchmarks.throughput JSON, and its config."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"throughput JSON {path} does not exist")
    data = json.loads(p.read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a benchmarks.throughput result (schema {data.get('schema')!r})")
    rows = {r["name"]: r for r in data["methods"]}
    if variant not in rows:
        raise ValueError(f"{path} has no variant {variant!r}; it has {', '.join(rows)}")
    return float(rows[variant]["img_per_s"]["median"]), data["config"]


def format_estimate(e: Estimate, title: str) -> str:
    hours = e.wall_hours
    lines = [title,
             f"  throughput: {e.img_per_s_per_device:,.1f} img/s per device x {e.devices} devices x "
             f"{e.efficiency:.2f} efficiency = {e.aggregate_img_per_s:,.1f} img/s",
             f"  work: {e.epochs:g} epochs x {e.dataset_size:,} images = {e.images:,.0f} images",
             "  wall-clock: " + (f"{hours:,.1f} h ({hours / 24:,.2f} days)" if hours >= 24 else f"{hours:,.2f} h"),
             f"  device-hours: {e.device_hours:,.1f}"]
    if e.cost is not None:
        lines.append(f"  cost: {e.cost:,.2f} at {e.price_per_device_hour:g} per device-hour")
    return "\n".join(lines)


def format_gpu_table(rows: list[dict[str, Any]], run: dict[str, Any], method: str) -> str:
    head = (f"ESTIMATES (not measurements) for {run['recipe']} ({run['arch']} @ {run['image_size']} px, "
            f"{method}, {run['epochs']:g} epochs x {run['dataset_size']:,} images): published ResNet-50 "
            f"training img/s / {rows[0]['flop_scale']:.2f} (training FLOPs relative to ResNet-50)")
    has_cost = rows[0]["one_gpu"]["cost"] is not None
    lines = [head, f"{'GPU':<11}{'prec':<6}{'R50 img/s':>10}{'est img/s':>10}{'1 GPU wall':>16}{'8 GPUs wall':>16}"
                   f"{'8-GPU eff':>10}{'GPU-h (8)':>11}" + (f"{'cost (8)':>12}" if has_cost else "")]
    for r in rows:
        one, eight = r["one_gpu"], r["eight_gpus"]
        lines.append(f"{r['gpu']:<11}{r['precision']:<6}{r['resnet50_img_per_s']:>10,.0f}{r['est_img_per_s']:>10,.0f}"
                     f"{one['wall_hours']:>14,.1f} h{eight['wall_hours']:>14,.1f} h{r['efficiency_8']:>10.2f}"
                     f"{eight['device_hours']:>11,.0f}" + (f"{eight['cost']:>12,.0f}" if has_cost else "")
                     + ("" if r["published"] else " *"))
    if run["dataset"] != "imagenet":
        lines.append("Caution: small-image networks rarely reach ResNet-50's FLOP rate on a GPU (kernel "
                     "launch and memory bound); these estimates are optimistic. Measure with "
                     "benchmarks.throughput.")
    lines.append("Sources: " + _NVIDIA_DLE + ".")
    lines.append("* not a published figure: " + next(g.source for g in GPU_FIGURES if not g.published))
    return "\n".join(lines)


@dataclass
class CostConfig:
    img_per_s: float | None = option(None, "training images/s of one device (for this recipe)")
    from_json: str | None = option(None, "a benchmarks.throughput JSON: use its images/s for --method")
    method: str = option("dhm", "method (or throughput variant, e.g. dhm-p0.5)")
    branch_prob: float = option(1.0, "DHM branch probability (--gpu-table)")
    devices: int = option(1)
    efficiency: float | None = option(None, "multi-device scaling efficiency (default 1.0 on one device, 0.9 on "
                                      "several)")
    recipe: str = option("imagenet-resnet152", "gives epochs and dataset")
    epochs: float | None = option(None, "override the recipe's epochs")
    dataset_size: int | None = option(None, "override the training-set size")
    price: float | None = option(None, "price per device-hour (any currency)")
    gpu_table: bool = option(False, "estimates for well-known GPUs (from published figures)")
    budget_table: bool = option(False, "FLOP-based cost of the ImageNet budget recipes next to the paper's")
    json: str | None = option(None, "also write the result here")


def main(argv: list[str] | None = None) -> int:
    args = parse_settings(CostConfig, "benchmarks.cost", __doc__, argv)
    return cli(lambda: report(args))


def report(args: CostConfig) -> dict[str, Any]:
    """Print the estimate (and the GPU table) for `args`; returns the JSON-ready result."""
    if args.img_per_s is not None and args.from_json:
        raise ValueError("give --img-per-s or --from-json, not both")
    if args.budget_table:
        rows = budget_table()
        print(format_budget_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"budget_table": rows}, indent=2))
        return {"budget_table": rows}
    run = recipe_run(args.recipe)
    run["epochs"] = run["epochs"] if args.epochs is None else args.epochs
    run["dataset_size"] = run["dataset_size"] if args.dataset_size is None else args.dataset_size
    result: dict[str, Any] = {"run": run, "method": args.method}
    ips, source = args.img_per_s, "given"
    if args.from_json:
        ips, bench_cfg = from_throughput_json(args.from_json, args.method)
        measured = f"{bench_cfg['arch']} @ {bench_cfg['image_size']} px"
        source = f"{args.from_json} ({measured} on {bench_cfg['device']})"
        if bench_cfg["arch"] != run["arch"] or bench_cfg["image_size"] != run["image_size"]:
            print(f"note: the benchmark measured {measured}, the recipe trains {run['arch']} @ "
                  f"{run['image_size']} px", file=sys.stderr)
    if ips is not None:
        e = estimate(ips, args.devices, run["epochs"], run["dataset_size"], args.efficiency, args.price)
        print(format_estimate(e, f"{run['recipe']} ({run['arch']}, {args.method}) on {args.devices} device(s), "
                                 f"images/s {source}"))
        result.update(estimate=asdict(e), img_per_s_source=source)
    if args.gpu_table or ips is None:
        rows = gpu_table(run, args.method.split("-p")[0], args.branch_prob, args.price)
        print(format_gpu_table(rows, run, args.method))
        result["gpu_table"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main())
