"""A tiny ImageNet as downloaded: train/<wnid>/ (or per-class tars), a flat val/ of ILSVRC2012_val_*.JPEG,
and its ground truth as the devkit (folder or .tar.gz) or as LOC_val_solution.csv.

The devkit's meta.mat is tests/data/devkit_meta_tiny.mat, written by scipy.io.savemat (compressed, as
MATLAB writes) in the devkit's layout: four synsets, the three leaves numbered in an order that is not
the sorted wnids' (as in the real devkit), and one parent with num_children 3.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.sample_data import gradient_image

DATA = Path(__file__).parent / "data"
META = DATA / "devkit_meta_tiny.mat"
IDS = {"n02000002": 1, "n01000001": 2, "n03000003": 3}  # ILSVRC2012_ID of each leaf in that meta.mat
WNIDS = sorted(IDS)  # the class order


@dataclass
class TinyImageNet:
    root: Path
    val_truth: dict[str, str]  # val file name -> wnid
    labels: Path | None  # the ground-truth file or devkit written


def _jpeg(path: Path, side: int, blue: int) -> None:
    Image.fromarray(gradient_image(side, side + 8, blue)).save(path, quality=95, subsampling=0)


def write_tiny_imagenet(root: Path, *, form: str = "devkit", train_per_class: int = 4, val_count: int = 6,
                        side: int = 24, train_tars: bool = False, seed: int = 0) -> TinyImageNet:
    """form: "devkit", "devkit-tar", "loc" or "none" (no ground truth written)."""
    rng = np.random.default_rng(seed)
    for c, wnid in enumerate(WNIDS):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(train_per_class):
            _jpeg(folder / f"{wnid}_{i}.JPEG", side + 4 * i, 40 * c + 10 * i)
        if train_tars:
            with tarfile.open(root / "train" / f"{wnid}.tar", "w") as tar:
                for f in sorted(folder.iterdir()):
                    tar.add(f, arcname=f.name)
            shutil.rmtree(folder)
    (root / "val").mkdir()
    truth = {}
    for k in range(1, val_count + 1):
        name = f"ILSVRC2012_val_{k:08d}.JPEG"
        truth[name] = WNIDS[int(rng.integers(len(WNIDS)))]
        _jpeg(root / "val" / name, side + 2 * k, 20 * k)
    labels = write_ground_truth(root, truth, form)
    return TinyImageNet(root, truth, labels)


def write_ground_truth(root: Path, truth: dict[str, str], form: str) -> Path | None:
    if form == "loc":
        rows = ["ImageId,PredictionString"] + [f"{Path(n).stem},{w} 1 2 30 40 {w} 5 6 7 8"
                                               for n, w in sorted(truth.items(), reverse=True)]
        path = root / "LOC_val_solution.csv"
        path.write_text("\n".join(rows) + "\n")
        return path
    if form == "none":
        return None
    lines = "".join(f"{IDS[w]}\n" for _, w in sorted(truth.items()))
    if form == "devkit":
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        shutil.copy(META, data / "meta.mat")
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text(lines)
        return data.parent
    path = root / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in (("meta.mat", META.read_bytes()), ("ILSVRC2012_validation_ground_truth.txt",
                                                                lines.encode())):
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/data/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path
