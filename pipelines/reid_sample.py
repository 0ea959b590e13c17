"""A tiny person re-ID dataset in the Market-1501 (or DukeMTMC-reID) layout, for tests and `--quick`.

root/bounding_box_train, root/query and root/bounding_box_test hold JPEGs named as the real releases name
them; the test identities are not the training ones, and bounding_box_test also holds Market's junk
(-1) and distractor (0000) images. Each identity has its own colour, so a few steps already learn it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (64, 32)  # height, width: Market's 128 x 64 halved


def image_name(style: str, pid: int, cam: int, index: int) -> str:
    if style == "market1501":
        return f"{pid:04d}_c{cam}s1_{index:06d}_00.jpg" if pid >= 0 else f"-1_c{cam}s1_{index:06d}_00.jpg"
    return f"{pid:04d}_c{cam}_f{index:07d}.jpg"


def write_reid_sample(root: str | Path, style: str = "market1501", *, train_ids: int = 6, test_ids: int = 4,
                      cams: int = 3, per_cam: int = 2, seed: int = 0) -> Path:
    """Write the three folders under `root` (train_ids x cams x per_cam training images) and return it."""
    if style not in ("market1501", "dukemtmc"):
        raise ValueError(f"unknown re-ID sample style {style!r}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    colours = rng.integers(0, 256, (train_ids + test_ids + 1, 3))
    index = 0

    def write(folder: str, pid: int, cam: int, colour: np.ndarray) -> None:
        nonlocal index
        index += 1
        pixels = np.clip(colour + rng.normal(0, 20, (*SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / folder / image_name(style, pid, cam, index), quality=90)

    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for pid in range(1, train_ids + 1):
        for cam in range(1, cams + 1):
            for _ in range(per_cam):
                write("bounding_box_train", pid, cam, colours[pid])
    for pid in range(train_ids + 1, train_ids + test_ids + 1):
        for cam in range(1, cams + 1):
            write("query", pid, cam, colours[pid])
            for _ in range(per_cam):
                write("bounding_box_test", pid, cam, colours[pid])
    if style == "market1501":
        for cam in range(1, cams + 1):
            write("bounding_box_test", 0, cam, colours[0])  # distractors: a gallery identity never queried
            write("bounding_box_test", -1, cam, colours[train_ids + 1])  # junk: would match a query if counted
    return root
