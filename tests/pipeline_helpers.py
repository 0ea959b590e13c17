"""Shared pieces of the data-pipeline tests: extras gating, small configs, an independent float64
reference of the val transform, and reading crop geometry back from gradient images."""

from __future__ import annotations

import importlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import create_loaders
from pipelines.base import LoaderConfig

MEAN = np.array([0.485, 0.456, 0.406])  # written out again, not imported: the test must be independent
STD = np.array([0.229, 0.224, 0.225])
EXTRAS_REQUIRED = os.environ.get("DHM_FAST_REQUIRE_EXTRAS") == "1"


def require_extra(module: str, what: str) -> None:
    """Skip (loudly) when an optional backend is missing; fail instead under DHM_FAST_REQUIRE_EXTRAS=1."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        msg = (f"{what} is NOT installed ({e}): its tests did not run. Install it with "
               "`bash pipelines/install_extras.sh .venv/bin/pip`")
        if EXTRAS_REQUIRED:
            pytest.fail(msg + " (DHM_FAST_REQUIRE_EXTRAS=1 makes this a failure)", pytrace=False)
        pytest.skip(msg, allow_module_level=True)


def small_config(root: Path | str, cache_dir: Path | str, **overrides) -> LoaderConfig:
    cfg = LoaderConfig(dataset="imagenet", data_dir=str(root), batch_size=4, image_size=32, val_resize=40,
                       num_workers=2, cache_dir=str(cache_dir))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def collect(loader) -> tuple[np.ndarray, np.ndarray]:
    """All batches of one epoch as float64 [N, C, H, W] images and int64 labels, with checks on each."""
    xs, ys = [], []
    for images, labels in loader:
        assert images.dtype == torch.float32 and images.dim() == 4
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        xs.append(images.detach().cpu().double().numpy())
        ys.append(labels.cpu().numpy())
    return np.concatenate(xs), np.concatenate(ys)


def reference_val_image(path: str, size: int, resize: int) -> np.ndarray:
    """float64 [3, size, size]: PIL decode, shorter side to `resize` (bilinear), centre crop, normalise."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    rgb = rgb.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    arr = np.asarray(rgb, dtype=np.float64)[top:top + size, left:left + size] / 255.0
    return ((arr - MEAN) / STD).transpose(2, 0, 1)


def match_to_reference(outputs: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each output image, the index of the nearest reference image (mean squared difference)."""
    d = ((outputs[:, None] - reference[None]) ** 2).mean(axis=(2, 3, 4))
    return d.argmin(axis=1)


def crop_geometry(image: np.ndarray, src_h: int, src_w: int) -> tuple[float, float, bool]:
    """(area fraction, aspect w/h, flipped) of the source region that a normalised output of a
    `pipelines.sample_data` gradient image shows: red encodes the column, green the row."""
    px = image.transpose(1, 2, 0) * STD * 255 + MEAN * 255  # [H, W, 3] in 0..255
    out_h, out_w = px.shape[:2]
    red_first, red_last = px[:, 0, 0].mean(), px[:, -1, 0].mean()
    green_top, green_bottom = px[0, :, 1].mean(), px[-1, :, 1].mean()
    # Output pixel centres span (n - 1)/n of the crop: scale back to the whole crop.
    w = abs(red_last - red_first) / 255 * (src_w - 1) * out_w / (out_w - 1)
    h = abs(green_bottom - green_top) / 255 * (src_h - 1) * out_h / (out_h - 1)
    return w * h / (src_w * src_h), w / h, bool(red_first > red_last)


def write_undecodable_png(path: Path) -> None:
    """A PNG whose header, chunk CRCs and structure are valid but whose pixel data does not inflate:
    it passes the header check and fails only when decoded."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    i = data.index(b"IDAT")
    length = struct.unpack(">I", data[i - 4:i])[0]
    payload = bytearray(data[i + 4:i + 4 + length])
    payload[10:60] = bytes(range(50))
    data[i + 4:i + 4 + length] = payload
    data[i + 4 + length:i + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(payload)))
    path.write_bytes(bytes(data))


_betons: dict[str, tuple[str, str]] = {}


def _ffcv_files(root) -> tuple[str, str]:
    """Convert a dataset once per test session (raw pixels, so only the crop/resize differs)."""
    key = str(root)
    if key not in _betons:
        from pipelines.ffcv_convert import convert

        out = root.parent / (root.name + "-ffcv")
        written = convert(str(root), str(out), write_mode="raw", num_workers=1, page_size=1 << 21,
                          cache_dir=str(out / "validation-cache"))
        _betons[key] = (str(written["train"]), str(written["val"]))
    return _betons[key]


def make_loaders(backend: str, root, cache_dir, **overrides):
    if backend == "dali":
        require_extra("nvidia.dali", "NVIDIA DALI")
    if backend == "ffcv":
        require_extra("ffcv", "FFCV")
        from ffcv.pipeline.compiler import Compiler

        Compiler.set_enabled(False)  # numba compilation costs 10-30 s per loader; the logic is the same
        overrides["train_beton"], overrides["val_beton"] = _ffcv_files(root)
    cfg = small_config(root, cache_dir, backend=backend, **overrides)
    return create_loaders(cfg)
