"""Loader throughput, side by side in one run (images/second, higher is better).

    python -m benchmarks.bench_loaders [--quick]    # about 4 minutes on 2 cores; --quick: about 1

Generated ImageNet-like JPEGs (torchvision, DALI in CPU mode, FFCV three ways) and 32x32 images in memory
(the in-memory loader against torchvision's per-sample pipeline), each with the same workers, one untimed
warm-up epoch, then whole epochs timed. JSON and PNG go to --out-dir; the setup and figures: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import cli, environment, figure, option, output_folder, parse_settings
from pipelines import LoaderConfig, create_loaders
from pipelines.small_datasets import STATS

CIFAR_MEAN, CIFAR_STD = STATS["cifar10"]
# name: (backend, FFCV write mode, FFCV longest side). FFCV: like for like (every image a JPEG at full
# size), FFCV's ImageNet recipe (half raw pixels), raw pixels at most 256 px (no decoding at all).
JPEG_LOADERS = {"torchvision": ("torchvision", None, None), "dali-cpu": ("dali", None, None),
                "ffcv-jpg": ("ffcv", "jpg", None), "ffcv-proportion": ("ffcv", "proportion", None),
                "ffcv-raw-256": ("ffcv", "raw", 256)}


# --- data ---------------------------------------------------------------------------------------

def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] with smooth colour regions, mid-frequency texture and fine noise, so that it
    compresses (and decodes) like a photograph rather than like noise or a flat image."""
    def upscale(a: np.ndarray, resample: int) -> np.ndarray:
        img = Image.fromarray((a * 255).astype(np.uint8)).resize((width, height), resample)
        return np.asarray(img, dtype=np.float32)

    colour = upscale(rng.random((height // 32 + 2, width // 32 + 2, 3)), Image.BICUBIC)
    texture = upscale(rng.random((height // 4 + 1, width // 4 + 1)), Image.BILINEAR)[..., None]
    img = 0.7 * colour + 0.3 * texture + rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_class(args: tuple[Path, int, int]) -> None:
    folder, count, seed = args
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w = int(rng.integers(400, 501))
        h = int(round(w * rng.uniform(0.6, 0.9)))  # landscape mostly, like ImageNet (500x375 typical)
        if rng.random() < 0.2:
            w, h = h, w
        Image.fromarray(natural_image(rng, h, w)).save(folder / f"img_{i:05d}.JPEG", quality=90)


def make_jpeg_folder(root: Path, num_images: int, num_classes: int = 10, workers: int = 2) -> Path:
    """root/{train,val}/class_XX/*.JPEG, reused when already complete."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == str(num_images):
        return root
    per_class = -(-num_images // num_classes)
    jobs = [(root / "train" / f"class_{c:02d}", per_class, c) for c in range(num_classes)]
    jobs += [(root / "val" / f"class_{c:02d}", 2, 1000 + c) for c in range(num_classes)]
    print(f"generating {per_class * num_classes} JPEGs in {root} ...", flush=True)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_class, jobs))
    done.write_text(str(num_images))
    return root


# --- timing -------------------------------------------------------------------------------------

def throughput(name: str, loader, seconds: float) -> dict:
    """Images/second over whole epochs after one warm-up epoch (printed as one row)."""
    t0 = time.perf_counter()
    for _ in loader:
        pass
    start = time.perf_counter()
    images = epochs = 0
    while epochs == 0 or time.perf_counter() - start < seconds:
        epochs += 1
        loader.set_epoch(epochs)
        images += sum(batch.shape[0] for batch, _ in loader)
    elapsed = time.perf_counter() - start
    r = {"images_per_s": images / elapsed, "images": images, "seconds": elapsed, "epochs": epochs,
         "warmup_s": start - t0}
    print(f"{name:>22}: {r['images_per_s']:9.0f} img/s  ({images} images in {elapsed:.1f} s, "
          f"warm-up {r['warmup_s']:.1f} s)", flush=True)
    return r


def bench_jpeg(root: Path, workers: int, seconds: float, batch_size: int, out_dir: Path) -> dict:
    results: dict[str, dict] = {}
    for name, (backend, mode, max_res) in JPEG_LOADERS.items():
        cfg = LoaderConfig(backend=backend, dataset="imagenet", data_dir=str(root), batch_size=batch_size,
                           num_workers=workers, cache_dir=str(out_dir / "cache"))
        beton = root.parent / f"{root.name}-{name}" / "train.beton"
        try:
            if backend == "ffcv":
                if not beton.is_file():
                    from pipelines.ffcv_convert import convert

                    t0 = time.perf_counter()
                    convert(str(root), str(beton.parent), write_mode=mode, max_resolution=max_res, jpeg_quality=90,
                            compress_probability=0.5, num_workers=workers, splits=("train",),
                            cache_dir=cfg.cache_dir)
                    print(f"{name} conversion: {time.perf_counter() - t0:.1f} s")
                cfg.train_beton = cfg.val_beton = str(beton)
            train, val = create_loaders(cfg)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        results[name] = throughput(name, train, seconds)
        if backend == "ffcv":
            results[name]["beton_mb"] = beton.stat().st_size / 1e6
        train.close()
        val.close()
    return results


class _PerSampleCifar(torch.utils.data.Dataset):
    """The usual torchvision CIFAR pipeline: one PIL image at a time through the transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        from torchvision import transforms as T

        self.images, self.labels = images, labels
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(CIFAR_MEAN, CIFAR_STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class _EpochDataLoader(torch.utils.data.DataLoader):
    def set_epoch(self, epoch: int) -> None:
        """The loader contract's call; a plain DataLoader reshuffles by itself."""


def bench_small(num_images: int, workers: int, seconds: float, batch_size: int) -> dict:
    from pipelines.memory import MemoryLoader
    from pipelines.small_datasets import ArraySplit

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, num_images)
    split = ArraySplit(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))
    results = {name: throughput(f"{name} (32x32)", MemoryLoader(
        split, CIFAR_MEAN, CIFAR_STD, batch_size=batch_size, train=True, padding=4, channels_last=channels_last),
        seconds) for name, channels_last in (("memory", False), ("memory-channels-last", True))}
    per_sample = _EpochDataLoader(_PerSampleCifar(images, labels), batch_size=batch_size, shuffle=True,
                                  num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    results["torchvision"] = throughput("torchvision (32x32)", per_sample, seconds)
    return results


# --- report -------------------------------------------------------------------------------------

def plot(report: dict, path: Path) -> None:
    with figure(path, ncols=2, figsize=(10, 4)) as (fig, axes):
        for ax, key, title in ((axes[0], "jpeg_folder", "ImageNet-like JPEGs, RRC 224 + flip"),
                               (axes[1], "small_32x32", "32x32 images, pad-crop + flip")):
            rows = report[key]
            names = ["torchvision"] + [n for n in rows if n != "torchvision"]  # the baseline first, in grey
            values = [rows[n]["images_per_s"] for n in names]
            bars = ax.bar(names, values, color=["#888888"] + ["#2a7ab9"] * (len(names) - 1))
            for bar, v in zip(bars, values, strict=True):
                ax.annotate(f"{v:,.0f}\n({v / values[0]:.1f}x)", (bar.get_x() + bar.get_width() / 2, v),
                            ha="center", va="bottom", fontsize=9)
            ax.tick_params(axis="x", labelrotation=20)  # long backend names would overlap
            ax.set(title=title, ylabel="images / second", yscale="log" if key == "small_32x32" else "linear")
            ax.title.set_fontsize(10)
            ax.margins(y=0.25)
        fig.suptitle(f"Loader throughput, {report['workers']} workers/threads, "
                     f"{report['environment']['cpu_count']} x {report['environment']['cpu_model']}", fontsize=10)


@dataclass
class LoaderBenchConfig:
    quick: bool = option(False, "fewer images and shorter timing (about 1 minute)")
    images: int | None = option(None, "JPEGs to generate (default 2000, quick 400)")
    seconds: float | None = option(None, "timed seconds per loader (default 20, quick 4)")
    workers: int = option(2, "workers / threads for every loader")
    batch_size: int = option(64)
    data_dir: str | None = option(None, "where to generate the JPEG folder (default OUT/jpeg-N)")
    out_dir: str = option("bench_out")


def main(argv: list[str] | None = None) -> int:
    args = parse_settings(LoaderBenchConfig, "benchmarks.bench_loaders", __doc__, argv)
    return cli(lambda: run(args, argv))


def run(args: LoaderBenchConfig, argv: list[str] | None) -> None:
    num_images = args.images or (400 if args.quick else 2000)
    seconds = args.seconds or (4.0 if args.quick else 20.0)
    out_dir = output_folder(args.out_dir, "--out-dir")
    # One torch thread in the main process: the loaders work in their own workers, and on a busy 2-core
    # machine a second OpenMP thread here stalled batch-level ops (a 600 KB copy measured 20x slower).
    torch.set_num_threads(1)
    root = make_jpeg_folder(Path(args.data_dir or out_dir / f"jpeg-{num_images}"), num_images, workers=args.workers)
    print(f"JPEG folder ({num_images} images, {args.workers} workers, batch {args.batch_size}):")
    jpeg = bench_jpeg(root, args.workers, seconds, args.batch_size, out_dir)
    n_small = 5 * 1024 if args.quick else 20 * 1024
    print(f"32x32 images ({n_small} in memory, batch 128):")
    small = bench_small(n_small, args.workers, seconds, 128)
    report = {
        "environment": environment("cpu", "benchmarks.bench_loaders", argv),  # taken after the timing
        "workers": args.workers, "jpeg_folder": jpeg, "small_32x32": small,
        "speedup_vs_torchvision": {key: {k: v["images_per_s"] / rows["torchvision"]["images_per_s"]
                                         for k, v in rows.items()}
                                   for key, rows in (("jpeg_folder", jpeg), ("small_32x32", small))},
    }
    (out_dir / "loaders.json").write_text(json.dumps(report, indent=2))
    plot(report, out_dir / "loaders.png")
    print(json.dumps(report["speedup_vs_torchvision"], indent=2))
    print(f"wrote {out_dir / 'loaders.json'} and {out_dir / 'loaders.png'}")


if __name__ == "__main__":
    sys.exit(main())
