"""What a training run costs: wall-clock and device-hours from images/s, devices and a recipe.

    python -m benchmarks.cost --img-per-s 1200 --devices 8 --efficiency 0.9 \\
        --recipe imagenet-resnet152 --method dhm
    python -m benchmarks.cost --from-json bench_out/throughput/throughput.json --method dhm \\
        --recipe cifar100-resnet32
    python -m benchmarks.cost --recipe imagenet-resnet152 --method dhm --gpu-table

Aggregate images/s = per-device images/s x devices x scaling efficiency; wall-clock = epochs x
training-set size / aggregate; device-hours = wall-clock x devices (evaluation, start-up and
checkpoints not included). --gpu-table scales published ResNet-50 figures by training FLOPs: an
estimate, not a measurement (docs/benchmarks.md).
"""

from __future__ import annotations

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
    json: str | None = option(None, "also write the result here")


def main(argv: list[str] | None = None) -> int:
    args = parse_settings(CostConfig, "benchmarks.cost", __doc__, argv)
    return cli(lambda: report(args))


def report(args: CostConfig) -> dict[str, Any]:
    """Print the estimate (and the GPU table) for `args`; returns the JSON-ready result."""
    if args.img_per_s is not None and args.from_json:
        raise ValueError("give --img-per-s or --from-json, not both")
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
