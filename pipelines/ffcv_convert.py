"""Convert an ImageFolder dataset (train/ and val/) into FFCV .beton files.

Writes OUT/train.beton, OUT/val.beton and OUT/classes.txt (class index -> the sorted folder names every
backend uses). Files are checked first (pipelines.imagefolder): bad ones are skipped and listed, or stop
the conversion with --strict-data. Usage and write modes: docs/data.md, "FFCV files".
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.imagefolder import VALIDATION_MODES, ImageList, scan_imagefolder

WRITE_MODES = ("jpg", "raw", "proportion", "smart")
DEFAULT_PAGE = 8 << 20  # FFCV's default page: 8 MiB


class _FolderSamples:
    """Indexable (image, label) view of a validated list, read by FFCV's writer processes.

    FFCV's writer waits forever for a sample whose worker raised, so a file that fails to decode
    here (one that passed the header check but not a full decode) is written as a grey image,
    recorded in `failure_dir`, and the conversion is failed afterwards, naming it.
    """

    def __init__(self, images: ImageList, failure_dir: str) -> None:
        self.images, self.failure_dir = images, failure_dir

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path = self.images.files[index]
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            with open(os.path.join(self.failure_dir, f"{os.getpid()}.txt"), "a", encoding="utf-8") as f:
                f.write(f"{path}\t{type(e).__name__}: {e}\n")
            rgb = np.full((8, 8, 3), 128, dtype=np.uint8)
        return rgb, self.images.labels[index]


def page_size_for(max_resolution: int | None, write_mode: str) -> int:
    """A page must hold the largest sample: raw pixels of a max_resolution square, when capped."""
    if max_resolution is None or write_mode == "jpg":
        return DEFAULT_PAGE
    need = max_resolution * max_resolution * 3 + 4096
    return max(DEFAULT_PAGE, 1 << (need - 1).bit_length())


def write_beton(images: ImageList, out: Path, fields: dict, num_workers: int, page_size: int) -> None:
    """`images` as the .beton file `out`, written under a temporary name and renamed when complete."""
    from ffcv.writer import DatasetWriter

    tmp = out.with_name(out.name + ".partial")
    with tempfile.TemporaryDirectory() as failures:
        writer = DatasetWriter(str(tmp), fields, num_workers=num_workers, page_size=page_size)
        print(f"writing {out} ({len(images)} images)", file=sys.stderr, flush=True)
        writer.from_indexed_dataset(_FolderSamples(images, failures), chunksize=64)
        failed = [line for name in sorted(os.listdir(failures))
                  for line in Path(failures, name).read_text(encoding="utf-8").splitlines()]
    if failed:
        tmp.unlink(missing_ok=True)
        raise ValueError(
            f"{len(failed)} files passed the header check but do not decode (first: "
            f"{failed[0].replace(chr(9), ': ')}); rerun with --validation full to skip them"
        )
    os.replace(tmp, out)


def convert(data_dir: str, out: str, *, max_resolution: int | None = None, jpeg_quality: int = 90,
            write_mode: str = "proportion", compress_probability: float = 0.5,
            smart_threshold: int | None = None, num_workers: int | None = None, strict: bool = False,
            validation: str = "header", splits: Sequence[str] = ("train", "val"),
            page_size: int | None = None, cache_dir: str | None = None, val_labels: str | None = None
            ) -> dict[str, Path]:
    """Write OUT/<split>.beton for each split plus OUT/classes.txt; returns the written paths."""
    from ffcv.fields import IntField, RGBImageField

    if write_mode not in WRITE_MODES:
        raise ValueError(f"unknown write mode {write_mode!r}; choose one of {', '.join(WRITE_MODES)}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution is not None and max_resolution < 8:
        raise ValueError(f"--max-resolution must be at least 8, got {max_resolution}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"--compress-probability must be in [0, 1], got {compress_probability}")
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                               smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability),
        "label": IntField(),
    }
    train, val = scan_imagefolder(data_dir, strict=strict, mode=validation, cache_dir=cache_dir, val_labels=val_labels)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("".join(c + "\n" for c in train.classes), encoding="utf-8")
    written = {split: folder / f"{split}.beton" for split in ("train", "val") if split in splits}
    for split, path in written.items():
        write_beton(train if split == "train" else val, path, fields, max(1, num_workers or os.cpu_count() or 1),
                    page_size or page_size_for(max_resolution, write_mode))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.ffcv_convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--out", required=True, help="folder for train.beton, val.beton and classes.txt")
    p.add_argument("--max-resolution", type=int, default=None, help="cap on the longer side (pixels)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", choices=WRITE_MODES, default="proportion")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="JPEG share for --write-mode proportion")
    p.add_argument("--smart-threshold", type=int, default=None, help="bytes above which smart mode uses JPEG")
    p.add_argument("--num-workers", type=int, default=None, help="writer processes (default: all cores)")
    p.add_argument("--splits", nargs="+", choices=("train", "val"), default=["train", "val"])
    p.add_argument("--page-size", type=int, default=None, help="FFCV page size in bytes (a power of 2)")
    p.add_argument("--validation", choices=VALIDATION_MODES, default="header",
                   help="check file headers (fast) or decode every file first (full)")
    p.add_argument("--cache-dir", default=None, help="validation cache folder (default ~/.cache/dhm_fast)")
    p.add_argument("--val-labels", default=None,
                   help="ground truth of a flat val/ (the devkit or LOC_val_solution.csv; default: found in or above "
                        "--data-dir, see docs/imagenet.md)")
    p.add_argument("--strict-data", dest="strict", action="store_true",
                   help="stop at the first bad file instead of skipping it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = convert(**vars(args))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, path in written.items():
        print(f"{split}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
