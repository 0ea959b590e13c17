"""Readers for the small datasets that live in memory: Fashion-MNIST (IDX .gz) and CIFAR-10/100.

Each reader returns uint8 images [N, C, H, W] and int64 labels [N] as CPU tensors, plus the
per-channel mean/std used to normalise them. CIFAR's python release is pickled: it is read with a
restricted unpickler that only admits the numpy types the files hold, so a crafted file cannot run code.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipelines.base import check_labels, dataset_folder

DEFAULT_DIRS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist
}

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

STATS = {  # per-channel mean and std of the training images, in [0, 1] units
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10, "cifar100": 100}


@dataclass
class ArraySplit:
    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor  # int64 [N]


@dataclass
class ArrayDataset:
    name: str
    train: ArraySplit
    test: ArraySplit
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int


def resolve_data_dir(dataset: str, data_dir: str | None) -> Path:
    if data_dir:
        return dataset_folder(data_dir)
    if dataset in DEFAULT_DIRS:
        return Path(DEFAULT_DIRS[dataset])
    raise FileNotFoundError(f"--data-dir is required for dataset {dataset!r}")


def load_small_dataset(dataset: str, data_dir: str | None) -> ArrayDataset:
    """The dataset's two splits, every label checked against its number of classes."""
    root = resolve_data_dir(dataset, data_dir)
    if dataset == "fashion-mnist":
        train, test = _read_fashion_mnist(root)
    elif dataset in ("cifar10", "cifar100"):
        train, test = _read_cifar(root, dataset)
    else:
        raise ValueError(f"{dataset!r} is not a small in-memory dataset")
    mean, std = STATS[dataset]
    return ArrayDataset(dataset, train, test, mean, std, NUM_CLASSES[dataset])


# --- Fashion-MNIST -------------------------------------------------------------------------------

def _read_fashion_mnist(root: Path) -> tuple[ArraySplit, ArraySplit]:
    expected = [name for pair in FASHION_FILES.values() for name in pair]
    missing = [n for n in expected if not (root / n).is_file()]
    if missing:
        hint = " (install Debian's dataset-fashion-mnist or pass --data-dir)" if not root.exists() else ""
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} is missing {', '.join(missing)}; expected the four files "
            f"{', '.join(expected)}{hint}"
        )
    splits = []
    for split, (img_name, lbl_name) in FASHION_FILES.items():
        images = _read_idx(root / img_name, ndim=3)
        labels = _read_idx(root / lbl_name, ndim=1)
        check_labels(labels, NUM_CLASSES["fashion-mnist"], lambda i, f=root / lbl_name: f"{f}: sample {i}")
        if len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
        splits.append(
            ArraySplit(torch.from_numpy(images).unsqueeze(1).contiguous(), torch.from_numpy(labels).long())
        )
    return splits[0], splits[1]


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000080N, N = number of dimensions)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable gzip IDX file ({e})") from None
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: {len(data)} bytes")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != 0x0800 + ndim:
        raise ValueError(f"{path} is not an IDX file of {ndim}-d uint8 data (magic {magic:#x})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: {body.size} values for shape {dims}")
    return body.reshape(dims).copy()


# --- CIFAR ---------------------------------------------------------------------------------------

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's pickles contain (numpy arrays of numbers, dicts, lists, bytes)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_cifar(root: Path, dataset: str) -> tuple[ArraySplit, ArraySplit]:
    folder, train_files, test_files, label_key = CIFAR_LAYOUT[dataset]
    base = root / folder if (root / folder).is_dir() else root
    missing = [n for n in train_files + test_files if not (base / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{dataset} folder {base} is missing {', '.join(missing)}; expected the python release "
            f"layout ({folder}/ with {', '.join(train_files + test_files)})"
        )
    return (_read_cifar_files(base, train_files, label_key, NUM_CLASSES[dataset]),
            _read_cifar_files(base, test_files, label_key, NUM_CLASSES[dataset]))


def _read_cifar_files(base: Path, names: list[str], label_key: bytes, num_classes: int) -> ArraySplit:
    images, labels = [], []
    for name in names:
        path = base / name
        try:
            with open(path, "rb") as f:
                entry = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
            data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lbl = np.asarray(entry[label_key], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
            raise ValueError(f"{path} is not a CIFAR python batch ({e})") from None
        check_labels(lbl, num_classes, lambda i, f=path: f"{f}: sample {i}")
        images.append(data)
        labels.append(lbl)
    return ArraySplit(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))
