"""Generate small ImageFolder datasets of JPEGs (for tests, benchmarks and trying the CLI).

Every image encodes its own geometry: red grows with the column (0 at the left edge, 255 at the
right), green with the row, and blue is one level per image, distinct within a split (evenly spread
levels in a random order). From any crop of such an image a test can read back which region was
cropped and whether it was flipped, and tell images apart. JPEGs are written without chroma
subsampling so that colours, and with them positions, survive compression. With `odd_files=True` the
dataset also holds what real ImageNet holds: a grayscale JPEG, a CMYK JPEG and a PNG saved under a
.JPEG name (all valid), plus a garbage file and a truncated JPEG (both invalid).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

QUALITY = 95  # JPEG quality of every generated image


@dataclass
class SampleDataset:
    root: Path
    classes: list[str]
    counts: dict[str, int]  # split -> number of valid images
    bad_files: list[Path] = field(default_factory=list)  # files a backend must skip
    odd_files: list[Path] = field(default_factory=list)  # valid but unusual (gray, CMYK, PNG)


def gradient_image(height: int, width: int, blue: int) -> np.ndarray:
    """uint8 [H, W, 3]: red = column position, green = row position, blue constant."""
    red, green = np.meshgrid(np.round(np.linspace(0, 255, width)), np.round(np.linspace(0, 255, height)))
    return np.stack([red, green, np.full_like(red, blue)], axis=2).astype(np.uint8)


def write_imagefolder(
    root: str | Path,
    *,
    num_classes: int = 3,
    train_per_class: int = 6,
    val_per_class: int = 4,
    min_side: int = 48,
    max_side: int = 160,
    sizes: list[tuple[int, int]] | None = None,
    odd_files: bool = True,
    seed: int = 0,
) -> SampleDataset:
    """Write root/{train,val}/class_XX/*.JPEG; sizes are (height, width), drawn when not given."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    classes = [f"class_{i:02d}" for i in range(num_classes)]
    out = SampleDataset(root, classes, {})
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        levels = np.round(np.linspace(0, 255, num_classes * per_class + 3 * odd_files)).astype(int)
        blues = iter(rng.permutation(levels))
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                if sizes:
                    h, w = sizes[(c * per_class + i) % len(sizes)]
                else:
                    h, w = (int(s) for s in rng.integers(min_side, max_side + 1, size=2))
                img = gradient_image(h, w, int(next(blues)))
                path = folder / f"{split}_{c}_{i:04d}.JPEG"
                Image.fromarray(img).save(path, quality=QUALITY, subsampling=0)
        out.counts[split] = num_classes * per_class
        if odd_files:
            _write_odd_files(root / split, classes, [int(next(blues)) for _ in range(3)], rng, out)
    return out


def _write_odd_files(split_dir: Path, classes: list[str], blues: list[int], rng: np.random.Generator,
                     out: SampleDataset) -> None:
    # Valid oddities (every backend must decode them) and invalid files, in each split.
    split, folder = split_dir.name, split_dir / classes[-1]
    gray = folder / f"{split}_gray.JPEG"
    Image.fromarray(gradient_image(70, 90, blues[0])).convert("L").save(gray, quality=QUALITY)
    cmyk = folder / f"{split}_cmyk.JPEG"
    Image.fromarray(gradient_image(80, 60, blues[1])).convert("CMYK").save(cmyk, quality=QUALITY)
    png = folder / f"{split}_png.JPEG"
    Image.fromarray(gradient_image(64, 100, blues[2])).save(png, format="PNG")
    out.odd_files += [gray, cmyk, png]
    out.counts[split] += 3
    garbage = split_dir / classes[0] / f"{split}_garbage.JPEG"
    garbage.write_bytes(rng.integers(0, 256, size=3000, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    Image.fromarray(gradient_image(70, 90, 0)).save(buf, format="JPEG", quality=QUALITY)
    truncated = split_dir / classes[0] / f"{split}_truncated.JPEG"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    out.bad_files += [garbage, truncated]
