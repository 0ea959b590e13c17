"""Loader throughput, side by side in one run (images/second, higher is better).

1. ImageNet-like JPEG folder (generated: ~500x375 JPEGs of natural-looking texture, quality 90): the
   training pipeline (random-resized-crop 224 + flip + normalise, batches of 64) of torchvision
   (ImageFolder-style dataset + DataLoader workers), DALI in CPU mode and FFCV, all with the same
   number of workers/threads. FFCV three times: "ffcv-jpg" stores every image as a quality-90 JPEG at
   full resolution (like for like: every backend decodes a JPEG per image), "ffcv-proportion" stores
   half of them as raw pixels (FFCV's ImageNet recipe; a bigger file, less decoding), "ffcv-raw-256"
   stores raw pixels with the longer side at most 256 (no decoding at all; FFCV's low-resolution
   training setup, where the crop is taken from a smaller image).
2. 32x32 data (CIFAR-sized, random uint8): the in-memory loader (pipelines.memory: the whole set is
   one tensor, pad-crop + flip + normalise on whole batches; NCHW and channels-last batches, the
   trainer's default) against torchvision's per-sample
   pipeline (a Dataset of PIL images with RandomCrop(32, padding=4) + flip + ToTensor + Normalize).

Each loader runs one warm-up pass (FFCV compiles its pipeline then; DALI and the DataLoader start
their threads/workers), then full epochs are timed until --seconds have passed. The main process
runs torch with --torch-threads (default 1): the loaders' per-image work happens in their own
workers/threads, and on a busy 2-core machine a second OpenMP thread in the main process stalls
batch-level ops (a 600 KB copy measured 20x slower with 2 threads than with 1).

    python -m benchmarks.bench_loaders            # about 4 minutes on 2 cores
    python -m benchmarks.bench_loaders --quick    # about 1 minute
Writes JSON and a PNG bar chart into --out-dir (default bench_out/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import environment
from pipelines.base import LoaderConfig

# --- data ---------------------------------------------------------------------------------------

def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] with smooth colour regions, mid-frequency texture and fine noise, so that it
    compresses (and decodes) like a photograph rather than like noise or a flat image."""
    base = rng.random((height // 32 + 2, width // 32 + 2, 3))
    colour = Image.fromarray((base * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    texture = Image.fromarray((rng.random((height // 4 + 1, width // 4 + 1)) * 255).astype(np.uint8))
    texture = np.asarray(texture.resize((width, height), Image.BILINEAR), dtype=np.float32)[..., None]
    img = 0.7 * np.asarray(colour, dtype=np.float32) + 0.3 * texture
    img += rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_class(args: tuple[Path, int, int, int]) -> None:
    folder, count, seed, quality = args
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w = int(rng.integers(400, 501))
        h = int(round(w * rng.uniform(0.6, 0.9)))  # landscape mostly, like ImageNet (500x375 typical)
        if rng.random() < 0.2:
            w, h = h, w
        Image.fromarray(natural_image(rng, h, w)).save(folder / f"img_{i:05d}.JPEG", quality=quality)


def make_jpeg_folder(root: Path, num_images: int, num_classes: int = 10, workers: int = 2) -> Path:
    """root/{train,val}/class_XX/*.JPEG, reused when already complete."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == str(num_images):
        return root
    per_class = -(-num_images // num_classes)
    jobs = [(root / "train" / f"class_{c:02d}", per_class, c, 90) for c in range(num_classes)]
    jobs += [(root / "val" / f"class_{c:02d}", 2, 1000 + c, 90) for c in range(num_classes)]
    print(f"generating {per_class * num_classes} JPEGs in {root} ...", flush=True)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_class, jobs))
    done.write_text(str(num_images))
    return root


# --- timing -------------------------------------------------------------------------------------

def throughput(loader, seconds: float) -> dict:
    """Images/second over whole epochs after one warm-up epoch."""
    t0 = time.perf_counter()
    for _ in loader:
        pass
    warmup = time.perf_counter() - t0
    images, epochs = 0, 0
    start = time.perf_counter()
    while True:
        loader.set_epoch(epochs + 1)
        for batch, _ in loader:
            images += batch.shape[0]
        epochs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return {"images_per_s": images / elapsed, "images": images, "seconds": elapsed, "epochs": epochs,
            "warmup_s": warmup}


def bench_jpeg(root: Path, workers: int, seconds: float, batch_size: int, out_dir: Path) -> dict:
    cfg = LoaderConfig(dataset="imagenet", data_dir=str(root), batch_size=batch_size, num_workers=workers,
                       cache_dir=str(out_dir / "cache"))
    results: dict[str, dict] = {}

    from pipelines.torchvision_loader import create_torchvision_loaders
    train, _ = create_torchvision_loaders(cfg)
    results["torchvision"] = throughput(train, seconds)
    print_row("torchvision", results["torchvision"])

    try:
        from pipelines.dali import create_dali_loaders
        train, _ = create_dali_loaders(cfg)
        results["dali-cpu"] = throughput(train, seconds)
        print_row("dali-cpu", results["dali-cpu"])
        train.close()
    except ImportError as e:
        print(f"dali-cpu: skipped ({e})")

    # (name, write mode, longest side stored): like for like (JPEGs at full size), FFCV's ImageNet
    # storage recipe (half raw), and raw pixels at 256 px (no decoding; FFCV's low-res training setup).
    for name, mode, max_res in (("ffcv-jpg", "jpg", None), ("ffcv-proportion", "proportion", None),
                                ("ffcv-raw-256", "raw", 256)):
        try:
            from pipelines.ffcv import create_ffcv_loaders
            from pipelines.ffcv_convert import convert
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        beton_dir = root.parent / f"{root.name}-{name}"
        if not (beton_dir / "train.beton").is_file():
            t0 = time.perf_counter()
            convert(str(root), str(beton_dir), write_mode=mode, max_resolution=max_res, jpeg_quality=90,
                    compress_probability=0.5, num_workers=workers, splits=("train",),
                    cache_dir=str(out_dir / "cache"))
            print(f"{name} conversion: {time.perf_counter() - t0:.1f} s")
        cfg.train_beton = cfg.val_beton = str(beton_dir / "train.beton")
        train, _ = create_ffcv_loaders(cfg)
        results[name] = throughput(train, seconds)
        results[name]["beton_mb"] = (beton_dir / "train.beton").stat().st_size / 1e6
        print_row(name, results[name])
    return results


class _PerSampleCifar(torch.utils.data.Dataset):
    """The usual torchvision CIFAR pipeline: one PIL image at a time through the transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        from torchvision import transforms as T

        self.images, self.labels = images, labels
        self.transform = T.Compose([
            T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
            T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class _Epochs:
    """Gives a plain DataLoader the loader contract's set_epoch (a no-op here)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def set_epoch(self, epoch: int) -> None:
        pass


def bench_small(num_images: int, workers: int, seconds: float, batch_size: int) -> dict:
    from pipelines.memory import MemoryLoader
    from pipelines.small_datasets import ArraySplit

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, num_images)
    results = {}
    split = ArraySplit(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))
    for name, channels_last in (("memory", False), ("memory-channels-last", True)):
        memory = MemoryLoader(split, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), batch_size=batch_size,
                              train=True, padding=4, channels_last=channels_last)
        results[name] = throughput(memory, seconds)
        print_row(f"{name} (32x32)", results[name])
    per_sample = torch.utils.data.DataLoader(_PerSampleCifar(images, labels), batch_size=batch_size,
                                             shuffle=True, num_workers=workers, drop_last=True,
                                             persistent_workers=workers > 0)
    results["torchvision"] = throughput(_Epochs(per_sample), seconds)
    print_row("torchvision (32x32)", results["torchvision"])
    return results


# --- report -------------------------------------------------------------------------------------

def print_row(name: str, r: dict) -> None:
    print(f"{name:>22}: {r['images_per_s']:9.0f} img/s  ({r['images']} images in {r['seconds']:.1f} s, "
          f"warm-up {r['warmup_s']:.1f} s)", flush=True)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "jpeg_folder", "ImageNet-like JPEGs, RRC 224 + flip"),
                           (axes[1], "small_32x32", "32x32 images, pad-crop + flip")):
        rows = report[key]
        names = ["torchvision"] + [n for n in rows if n != "torchvision"]  # the baseline first, in grey
        values = [rows[n]["images_per_s"] for n in names]
        bars = ax.bar(names, values, color=["#888888"] + ["#2a7ab9"] * (len(names) - 1))
        base = rows["torchvision"]["images_per_s"]
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(f"{v:,.0f}\n({v / base:.1f}x)", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=9)
        ax.tick_params(axis="x", labelrotation=20)  # long backend names would overlap
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("images / second")
        ax.set_yscale("log" if key == "small_32x32" else "linear")
        ax.margins(y=0.25)
    fig.suptitle(f"Loader throughput, {report['workers']} workers/threads, "
                 f"{report['environment']['cpu_count']} x {report['environment']['cpu_model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_loaders",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer images and shorter timing (about 1 minute)")
    p.add_argument("--images", type=int, default=None, help="JPEGs to generate (default 2000, quick 400)")
    p.add_argument("--seconds", type=float, default=None,
                   help="timed seconds per loader (default 20, quick 4)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--workers", type=int, default=2, help="workers / threads for every loader")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-dir", default=None, help="where to generate the JPEG folder (default OUT/jpeg-N)")
    p.add_argument("--out-dir", default="bench_out")
    args = p.parse_args(argv)
    num_images = args.images or (400 if args.quick else 2000)
    seconds = args.seconds or (4.0 if args.quick else 20.0)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.torch_threads))
    root = make_jpeg_folder(Path(args.data_dir or out_dir / f"jpeg-{num_images}"), num_images,
                            workers=args.workers)
    print(f"JPEG folder ({num_images} images, {args.workers} workers, batch {args.batch_size}):")
    jpeg = bench_jpeg(root, args.workers, seconds, args.batch_size, out_dir)
    n_small = 5 * 1024 if args.quick else 20 * 1024
    print(f"32x32 images ({n_small} in memory, batch 128):")
    small = bench_small(n_small, args.workers, seconds, 128)
    report = {
        "environment": environment("cpu", "benchmarks.bench_loaders", argv),  # taken after the timing
        "workers": args.workers,
        "jpeg_folder": jpeg,
        "small_32x32": small,
        "speedup_vs_torchvision": {key: {k: v["images_per_s"] / rows["torchvision"]["images_per_s"]
                                         for k, v in rows.items()}
                                   for key, rows in (("jpeg_folder", jpeg), ("small_32x32", small))},
    }
    (out_dir / "loaders.json").write_text(json.dumps(report, indent=2))
    plot(report, out_dir / "loaders.png")
    print(json.dumps(report["speedup_vs_torchvision"], indent=2))
    print(f"wrote {out_dir / 'loaders.json'} and {out_dir / 'loaders.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
