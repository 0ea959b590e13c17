"""Tiny stand-ins for the small datasets' files, written the way the real releases are laid out:
Fashion-MNIST as four gzipped IDX files, CIFAR-10 as the pickled python batches."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped IDX file of unsigned bytes: magic 0x0000080N (N dimensions), the sizes, the data."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fashion_mnist(folder: Path, *, n_train: int = 32, n_test: int = 16, side: int = 28,
                        seed: int = 0) -> Path:
    """Random images of side x side pixels (the reader takes the size from the IDX header)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_idx(folder / FASHION_FILES[0], rng.integers(0, 256, (n_train, side, side)))
    write_idx(folder / FASHION_FILES[1], rng.integers(0, 10, n_train))
    write_idx(folder / FASHION_FILES[2], rng.integers(0, 256, (n_test, side, side)))
    write_idx(folder / FASHION_FILES[3], rng.integers(0, 10, n_test))
    return folder


def write_cifar10(root: Path, *, per_file: int = 8, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/ with the five training batches and the test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in CIFAR10_FILES:
        entry = {b"data": rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_file).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    return folder


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its bytes, as an interrupted download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
