"""Scan and validate an ImageFolder dataset once, for every backend.

Layout: `root/train/<class>/<image>` and `root/val/<class>/<image>`, or ImageNet's flat `root/val/` with its
ground truth (pipelines.imagenet_layout). Class indices are the sorted train folder names, so every backend
(and every split) maps a folder to the same index.

Each file is checked once, up front, because a bad file hurts every backend differently: torchvision
loses a worker, DALI loses a whole batch ("Critical error in pipeline"), FFCV's writer hangs. A
file that fails is skipped, counted and reported by path; with `strict=True` the first one raises.

Checks ("header" mode, the default, reads the header and the last bytes of each file):
  - PIL identifies it as an image in a format every backend decodes (JPEG, PNG, BMP, TIFF, WebP, PPM),
  - PIL's `verify()` passes (PNG chunk CRCs, structure),
  - a JPEG ends with its end-of-image marker (a truncated download does not).
"full" mode also decodes every pixel (several ms per image; use it once on a suspicious dataset).
Verdicts are cached per file (keyed by size and mtime), so a rerun only checks new or changed files.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipelines import imagenet_layout
from pipelines.base import LoaderConfig, dataset_folder
from pipelines.sharding import subset_indices

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Formats that PIL, DALI's decoders and FFCV's converter all read.
DECODABLE_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "MPO"}
VALIDATION_MODES = ("header", "full")
_CACHE_VERSION = "1"


@dataclass
class ImageList:
    """The validated samples of one split: parallel lists of file paths and class indices."""

    root: Path  # the split folder
    classes: list[str]  # index -> class folder name (shared by both splits)
    files: list[str] = field(default_factory=list)  # absolute paths
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of rejected files

    def __len__(self) -> int:
        return len(self.files)

    def skipped_report(self) -> str:
        """One line per skipped file, for the log and the end-of-epoch summary."""
        return "\n".join(f"  skipped {path}: {why}" for path, why in self.skipped)


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of one split; one-line errors for a missing or unreadable split."""
    if not split_dir.exists():
        raise FileNotFoundError(
            f"dataset split folder {split_dir} does not exist (expected {split_dir.parent}/train and /val)"
        )
    if not split_dir.is_dir():
        raise NotADirectoryError(f"dataset split {split_dir} is not a folder")
    try:
        entries = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    except PermissionError:
        raise PermissionError(f"cannot read dataset folder {split_dir} (permission denied)") from None
    if not entries:
        raise ValueError(f"{split_dir} has no class folders")
    return entries


def check_image(path: str, full: bool = False) -> str | None:
    """Why `path` cannot be used as a training image, or None when it is fine."""
    try:
        with Image.open(path) as img:
            fmt = img.format
            if fmt not in DECODABLE_FORMATS:
                return f"unsupported image format {fmt}"
            img.verify()
        if fmt in ("JPEG", "MPO") and not _jpeg_has_end_marker(path):
            return "truncated JPEG (no end-of-image marker)"
        if full:
            with Image.open(path) as img:  # verify() leaves the image unusable: reopen
                img.convert("RGB").load()
    except UnidentifiedImageError:
        return "not an image file"
    except PermissionError:
        return "permission denied"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot decode ({type(e).__name__}: {e})"
    return None


def _jpeg_has_end_marker(path: str) -> bool:
    # Marker bytes FF D9 cannot occur inside entropy-coded data (FF is stuffed as FF 00), so a JPEG
    # whose tail lacks them was cut short. Some writers pad after the marker: allow a short tail.
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64))
        tail = f.read()
    return b"\xff\xd9" in tail


def scan_split(
    root: str | Path,
    split: str,
    classes: list[str] | None = None,
    *,
    strict: bool = False,
    mode: str = "header",
    cache_dir: str | Path | None = None,
    threads: int = 16,
    labels: Path | None = None,
) -> ImageList:
    """List and validate `root/split`. `classes` fixes the index mapping (the train split's); a split
    without class folders is a flat ImageNet val/ labelled by `labels` (pipelines.imagenet_layout)."""
    if mode not in VALIDATION_MODES:
        raise ValueError(f"unknown validation mode {mode!r}; choose one of {', '.join(VALIDATION_MODES)}")
    split_dir = Path(root).expanduser().resolve() / split
    if classes is not None and _is_flat(split_dir):
        if labels is None:
            raise ValueError(f"{split_dir} holds images but no class folders: give its ground truth with "
                             f"--val-labels ({imagenet_layout.LOC_CSV} or the {imagenet_layout.DEVKIT} devkit)")
        samples = imagenet_layout.flat_val_samples(split_dir, classes, labels)
    else:
        classes = _checked_classes(split_dir, classes)
        samples = _folder_samples(split_dir, classes)
    return _validated(split_dir, classes, samples, strict, mode, cache_dir, threads)


def _is_flat(split_dir: Path) -> bool:
    entries = [e for e in os.scandir(split_dir) if not e.name.startswith(".")] if split_dir.is_dir() else []
    return bool(entries) and not any(e.is_dir() for e in entries)


def _checked_classes(split_dir: Path, classes: list[str] | None) -> list[str]:
    found = find_classes(split_dir)
    if classes is None:
        return found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(
            f"{split_dir} has class folders absent from train/: {', '.join(unknown[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )
    return classes


def _folder_samples(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    samples = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # val may lack a class that train has
        try:
            entries = sorted((e for e in os.scandir(class_dir) if e.is_file()), key=lambda e: e.name)
        except PermissionError:
            raise PermissionError(f"cannot read class folder {class_dir} (permission denied)") from None
        entries = [e for e in entries if not e.name.startswith(".")]
        if not entries:
            raise ValueError(f"class folder {class_dir} is empty")
        samples += [(e.path, label) for e in entries]
    return samples


def _validated(split_dir: Path, classes: list[str], samples: list[tuple[str, int]], strict: bool, mode: str,
               cache_dir: str | Path | None, threads: int) -> ImageList:
    """The samples whose files pass check_image (verdicts cached per size and mtime)."""
    candidates = []  # (path, label, (size, mtime_ns))
    for path, label in samples:
        st = os.stat(path)
        candidates.append((path, label, (st.st_size, st.st_mtime_ns)))
    cache_file = _cache_path(split_dir, mode, cache_dir)
    cached = _read_cache(cache_file)
    todo = [c for c in candidates if cached.get(c[0], (None,))[0] != c[2]]
    if todo:
        log.info("validating %d of %d files in %s (%s mode)", len(todo), len(candidates), split_dir, mode)
        full = mode == "full"
        with ThreadPoolExecutor(max(1, threads)) as pool:
            verdicts = list(pool.map(lambda c: check_image(c[0], full), todo))
        for (path, _, key), why in zip(todo, verdicts, strict=True):
            cached[path] = (key, why)
        _write_cache(cache_file, {c[0]: cached[c[0]] for c in candidates})

    out = ImageList(root=split_dir, classes=list(classes))
    for path, label, _ in candidates:
        why = cached[path][1]
        if why is not None:
            if strict:
                raise ValueError(f"bad image {path}: {why} (--strict-data)")
            out.skipped.append((path, why))
            continue
        out.files.append(path)
        out.labels.append(label)
    if out.skipped:
        log.warning("skipped %d bad files in %s:\n%s", len(out.skipped), split_dir, out.skipped_report())
    if not out.files:
        raise ValueError(f"{split_dir} has no usable images")
    return out


def scan_imagefolder(
    root: str | Path | None,
    *,
    strict: bool = False,
    mode: str = "header",
    cache_dir: str | Path | None = None,
    val_labels: str | None = None,
) -> tuple[ImageList, ImageList]:
    """(train, val) lists of an ImageFolder root, with one class mapping from train/. val/ may also be
    ImageNet's flat folder, labelled by `val_labels` or by the ground truth found near `root`."""
    if root is None:
        raise ValueError("--data-dir is required for an ImageFolder dataset (a folder with train/ and val/)")
    base = dataset_folder(root)
    if not base.exists():
        raise FileNotFoundError(f"dataset folder {base} does not exist")
    if not os.access(base, os.R_OK | os.X_OK):
        raise PermissionError(f"cannot read dataset folder {base} (permission denied)")
    missing = [s for s in SPLITS if not (base / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"dataset folder {base} has no {' or '.join(m + '/' for m in missing)} split")
    try:
        return _scan_splits(base, strict, mode, cache_dir, val_labels)
    except PermissionError as e:
        if e.filename is None:  # already one of our one-line messages
            raise
        raise PermissionError(f"cannot read {e.filename} (permission denied)") from None


def _scan_splits(base: Path, strict: bool, mode: str, cache_dir: str | Path | None,
                 val_labels: str | None) -> tuple[ImageList, ImageList]:
    tars = imagenet_layout.train_tars_left(base / "train")
    if tars:
        raise ValueError(f"{base / 'train'} holds {len(tars)} per-class tar file(s) (e.g. {tars[0]}); extract "
                         f"them once with: {imagenet_layout.EXTRACT} {base / 'train'}")
    labels = imagenet_layout.find_labels(base.resolve(), val_labels)
    train = scan_split(base, "train", strict=strict, mode=mode, cache_dir=cache_dir)
    if labels is not None and labels.suffix != ".csv" and (val_labels or _is_flat(base / "val")):
        # The devkit labels this val/ or was named: its classes must be train/'s (a devkit merely lying
        # near a class-folder dataset, such as an ImageNet subset, is not this dataset's).
        imagenet_layout.check_class_order(train.classes, imagenet_layout.read_devkit(labels))
    val = scan_split(base, "val", train.classes, strict=strict, mode=mode, cache_dir=cache_dir, labels=labels)
    return train, val


def scan_dataset(config: LoaderConfig) -> tuple[ImageList, ImageList]:
    """The validated (train, val) lists of `config.data_dir`, train cut to `config.train_subset`."""
    train, val = scan_imagefolder(config.data_dir, strict=config.strict_data, mode=config.validation,
                                  cache_dir=config.cache_dir, val_labels=config.val_labels)
    if config.train_subset:
        keep = subset_indices(len(train), config.train_subset)
        train = ImageList(train.root, train.classes, [train.files[i] for i in keep],
                          [train.labels[i] for i in keep], train.skipped)
    return train, val


# --- verdict cache ------------------------------------------------------------------------------

def _cache_path(split_dir: Path, mode: str, cache_dir: str | Path | None) -> Path | None:
    base = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    digest = hashlib.sha1(f"{split_dir}|{mode}".encode()).hexdigest()[:16]
    return base / "dhm_fast" / "validated" / f"{split_dir.parent.name}-{split_dir.name}-{digest}.tsv.gz"


def _read_cache(path: Path | None) -> dict[str, tuple[tuple[int, int], str | None]]:
    """path -> ((size, mtime_ns), reason or None); empty when absent or unreadable."""
    out: dict[str, tuple[tuple[int, int], str | None]] = {}
    if path is None or not path.is_file():
        return out
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            if f.readline().rstrip("\n") != f"dhm_fast-validated\t{_CACHE_VERSION}":
                return out
            for line in f:
                p, size, mtime, why = line.rstrip("\n").split("\t", 3)
                out[p] = ((int(size), int(mtime)), why or None)
    except (OSError, ValueError, EOFError):
        return {}  # a damaged cache only costs a re-check
    return out


def _write_cache(path: Path | None, entries: dict[str, tuple[tuple[int, int], str | None]]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
            f.write(f"dhm_fast-validated\t{_CACHE_VERSION}\n")
            for p, ((size, mtime), why) in entries.items():
                if "\t" in p or "\n" in p:
                    continue  # not representable in the TSV: simply re-checked next time
                reason = (why or "").replace("\t", " ").replace("\n", " ")
                f.write(f"{p}\t{size}\t{mtime}\t{reason}\n")
        os.replace(tmp, path)  # atomic: concurrent ranks never read half a file
    except OSError as e:
        log.warning("could not write the validation cache %s (%s); files are re-checked next run", path, e)
