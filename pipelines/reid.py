"""Person re-ID data: Market-1501 and DukeMTMC-reID folders as downloaded, held on the device.

Layout: bounding_box_train/, query/ and bounding_box_test/ (the gallery), in --data-dir or in its
Market-1501-v15.09.15/ or DukeMTMC-reID/ subfolder. Names carry the identity and the camera:
Market `0002_c1s1_000451_03.jpg`, Duke `0001_c2_f0046182.jpg`. As the Market release defines them,
identity -1 marks junk boxes (no influence on accuracy: left out everywhere) and 0000 marks distractors
(kept in the gallery, where they can only be wrong answers; left out of training, having no identity).
Training identities are relabelled 0..N-1 in sorted order.

Every image is decoded once, resized to image_size x image_size/2 (height x width) and kept as uint8;
the training loader is the in-memory one (pipelines/memory.py: pad-and-crop and flip on the device).
A name that does not parse or an image that does not decode is skipped and reported (strict: the first
one raises); files that are not images (Market ships Thumbs.db files) are ignored.

The evaluation loader yields (images, sample index) over the query images, then the gallery, and carries
`pids`, `camids` and `num_query`; every process evaluates the whole set (no sharding).
"""

from __future__ import annotations

import logging
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipelines.base import LoaderConfig, dataset_folder
from pipelines.datasets import REID_DATASETS  # noqa: F401 - also this module's API
from pipelines.memory import MemoryLoader
from pipelines.small_datasets import ArraySplit
from pipelines.workers import resolve_num_workers

log = logging.getLogger(__name__)

RELEASE_FOLDERS = {"market1501": "Market-1501-v15.09.15", "dukemtmc": "DukeMTMC-reID"}
NAMES = {
    "market1501": re.compile(r"(-1|\d{4})_c(\d)s\d_\d{6}_\d{2}\.jpg"),
    "dukemtmc": re.compile(r"(\d{4})_c(\d)_f\d{7}\.jpg"),
}
SPLITS = ("bounding_box_train", "query", "bounding_box_test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
JUNK, DISTRACTOR = -1, 0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's: the pretrained trunk expects them
PADDING = 10  # pixels of zero padding before the random crop (the usual re-ID pad-and-crop)


@dataclass
class ReidSplit:
    files: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    camids: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def keep(self, indices: list[int]) -> None:
        self.files, self.pids, self.camids = ([v[i] for i in indices] for v in (self.files, self.pids, self.camids))


def find_root(dataset: str, data_dir: str | None) -> Path:
    if data_dir is None:
        raise ValueError(f"--data-dir is required for {dataset} (a folder with {', '.join(SPLITS)})")
    root = dataset_folder(data_dir)
    nested = root / RELEASE_FOLDERS[dataset]
    root = nested if nested.is_dir() else root
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise ValueError(f"{dataset} folder {root} has no {', '.join(m + '/' for m in missing)} folder")
    return root


def parse_split(folder: Path, dataset: str, strict: bool, left_out: tuple[int, ...] = (JUNK,)) -> ReidSplit:
    """Files with their identity and camera, identities `left_out` left out, malformed names skipped (or raised)."""
    out = ReidSplit()
    try:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except PermissionError:
        raise PermissionError(f"cannot read {dataset} folder {folder} (permission denied)") from None
    for path in paths:
        match = NAMES[dataset].fullmatch(path.name)
        if match is None:
            _skip(out, str(path), f"not a {dataset} image name", strict)
            continue
        pid, cam = int(match[1]), int(match[2])
        if pid not in left_out:
            out.files.append(str(path))
            out.pids.append(pid)
            out.camids.append(cam)
    if not out.files:
        raise ValueError(f"{folder} has no usable {dataset} images")
    return out


def decode(split: ReidSplit, size: tuple[int, int], strict: bool, threads: int, show: bool = False) -> torch.Tensor:
    """uint8 [N, 3, height, width] of the split's images; files that fail are dropped from the split.
    `show`: a progress bar (Market-1501 alone holds some 32k JPEGs)."""

    def load(path: str) -> np.ndarray | str:
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB").resize(size[::-1], Image.BILINEAR))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            return f"cannot decode ({type(e).__name__}: {e})"

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(tqdm(pool.map(load, split.files), total=len(split.files), file=sys.stdout, leave=False,
                            desc=f"decoding {Path(split.files[0]).parent.name}", mininterval=2.0, disable=not show))
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    for i, r in enumerate(results):
        if isinstance(r, str):
            _skip(split, split.files[i], r, strict)
    if not keep:
        raise ValueError(f"none of the {len(split.files)} images in {Path(split.files[0]).parent} decodes")
    split.keep(keep)
    return torch.from_numpy(np.stack([results[i] for i in keep])).permute(0, 3, 1, 2).contiguous()


def _skip(split: ReidSplit, path: str, why: str, strict: bool) -> None:
    if strict:
        raise ValueError(f"bad image {path}: {why} (--strict-data)")
    log.warning("skipped %s: %s", path, why)
    split.skipped.append((path, why))


def create_reid_loaders(config: LoaderConfig) -> tuple[MemoryLoader, MemoryLoader]:
    if config.backend not in ("auto", "memory"):
        raise ValueError(f"{config.dataset} is held in memory: --loader {config.backend} does not apply")
    root = find_root(config.dataset, config.data_dir)
    size, threads = (config.image_size, config.image_size // 2), resolve_num_workers(config.num_workers)
    train = parse_split(root / SPLITS[0], config.dataset, config.strict_data, left_out=(JUNK, DISTRACTOR))
    query, gallery = (parse_split(root / s, config.dataset, config.strict_data) for s in SPLITS[1:])
    show = config.rank == 0
    train_images = decode(train, size, config.strict_data, threads, show)
    identities = sorted(set(train.pids))
    relabel = {pid: i for i, pid in enumerate(identities)}
    labels = torch.tensor([relabel[p] for p in train.pids])
    query_images = decode(query, size, config.strict_data, threads, show)
    gallery_images = decode(gallery, size, config.strict_data, threads, show)
    common = dict(batch_size=config.batch_size, device=config.device, seed=config.seed,
                  channels_last=config.channels_last, num_classes=len(identities))
    train_loader = MemoryLoader(ArraySplit(train_images, labels), MEAN, STD, train=True, rank=config.rank,
                                world_size=config.world_size, padding=PADDING, drop_last=config.drop_last, **common)
    eval_images = torch.cat([query_images, gallery_images])
    eval_loader = MemoryLoader(ArraySplit(eval_images, torch.arange(len(eval_images))), MEAN, STD, train=False,
                               **common)
    eval_loader.pids = torch.tensor(query.pids + gallery.pids)
    eval_loader.camids = torch.tensor(query.camids + gallery.camids)
    eval_loader.num_query = len(query.files)
    train_loader.skipped, eval_loader.skipped = train.skipped, query.skipped + gallery.skipped
    for loader in (train_loader, eval_loader):
        loader.reason = f"re-ID images decoded once at {size[0]}x{size[1]} and held on the device"
    log.info("%s: %d training images of %d identities; %d queries, %d gallery images", config.dataset,
             len(train.files), len(identities), len(query.files), len(gallery.files))
    return train_loader, eval_loader
