"""Dataset scanning and validation (pipelines.imagefolder) and the sharding rule (pipelines.sharding)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pipeline_helpers import write_undecodable_png

import pipelines.imagefolder as imagefolder
from pipelines.imagefolder import check_image, scan_imagefolder
from pipelines.sample_data import gradient_image, write_imagefolder
from pipelines.sharding import epoch_indices, num_batches, shard_size


@pytest.fixture()
def dataset(tmp_path):
    return write_imagefolder(tmp_path / "data", seed=3)


def test_class_mapping_is_sorted_folder_names_shared_by_both_splits(tmp_path):
    root = tmp_path / "d"
    for split, names in (("train", ["zebra", "apple", "Mango"]), ("val", ["zebra", "apple"])):
        for name in names:
            (root / split / name).mkdir(parents=True)
            Image.fromarray(gradient_image(20, 30, 9)).save(root / split / name / "a.JPEG")
    train, val = scan_imagefolder(root, cache_dir=tmp_path / "c")
    assert train.classes == val.classes == ["Mango", "apple", "zebra"]  # sorted, byte order
    assert train.labels == [0, 1, 2]
    assert val.labels == [1, 2]  # val lacks Mango: indices still follow train's folders
    assert [os.path.basename(os.path.dirname(f)) for f in val.files] == ["apple", "zebra"]


def test_bad_files_skipped_with_reasons_and_odd_files_kept(dataset, tmp_path):
    train, val = scan_imagefolder(dataset.root, cache_dir=tmp_path / "c")
    skipped = dict(train.skipped + val.skipped)
    assert set(skipped) == {str(p) for p in dataset.bad_files}
    assert all(("truncated" in why) == ("truncated" in path) for path, why in skipped.items())
    for odd in dataset.odd_files:
        assert str(odd) in train.files + val.files
    assert (len(train), len(val)) == (dataset.counts["train"], dataset.counts["val"])
    assert "skipped" in train.skipped_report() and "garbage" in train.skipped_report()


def test_strict_mode_names_the_first_bad_file(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"bad image .*train_garbage\.JPEG: not an image file"):
        scan_imagefolder(dataset.root, strict=True, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("case,exc,pattern", [
    ("missing_root", FileNotFoundError, "does not exist"),
    ("missing_val", FileNotFoundError, "no val/ split"),
    ("empty_class", ValueError, "is empty"),
    ("no_classes", ValueError, "no class folders"),
    ("unknown_val_class", ValueError, "absent from train"),
    ("split_is_file", FileNotFoundError, "no val/ split"),
    ("only_bad_files", ValueError, "no usable images"),
    ("no_data_dir", ValueError, "--data-dir is required"),
])
def test_dataset_layout_errors_are_one_line(tmp_path, case, exc, pattern):
    root = tmp_path / "d"
    write_imagefolder(root, num_classes=2, train_per_class=1, val_per_class=1, odd_files=False)
    if case == "missing_root":
        root = tmp_path / "nowhere"
    elif case == "missing_val":
        shutil.rmtree(root / "val")
    elif case == "empty_class":
        (root / "train" / "class_02").mkdir()
    elif case == "no_classes":
        shutil.rmtree(root / "val")
        (root / "val").mkdir()
    elif case == "unknown_val_class":
        shutil.copytree(root / "val" / "class_00", root / "val" / "extra")
    elif case == "split_is_file":
        shutil.rmtree(root / "val")
        (root / "val").write_text("not a folder")
    elif case == "only_bad_files":
        for f in (root / "val").rglob("*.JPEG"):
            f.write_bytes(b"junk")
    with pytest.raises(exc, match=pattern) as info:
        scan_imagefolder(None if case == "no_data_dir" else root, cache_dir=tmp_path / "c")
    assert "\n" not in str(info.value)


def refuse_scandir(monkeypatch, folder_name_end: str) -> None:
    """The OS refusing to list one folder, as chmod 0 does for a non-root user (root reads anything)."""
    real = os.scandir

    def scandir(path):
        if str(path).endswith(folder_name_end):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(imagefolder.os, "scandir", scandir)


@pytest.mark.parametrize("split", ["train", "val"])
def test_unreadable_folder_is_a_one_line_error(tmp_path, monkeypatch, split):
    root = tmp_path / "d"
    write_imagefolder(root, num_classes=1, train_per_class=1, val_per_class=1, odd_files=False)
    if os.geteuid() == 0:
        refuse_scandir(monkeypatch, f"/{split}")
    else:
        os.chmod(root / split, 0)
    refusal = rf"^cannot read (dataset folder )?\S+/d/{split} \(permission denied\)$"
    try:
        with pytest.raises(PermissionError, match=refusal):
            scan_imagefolder(root, cache_dir=tmp_path / "c")
    finally:
        os.chmod(root / split, 0o755)


def test_unreadable_class_folder_is_a_one_line_error(tmp_path, monkeypatch):
    root = tmp_path / "d"
    write_imagefolder(root, num_classes=2, train_per_class=1, val_per_class=1, odd_files=False)
    refuse_scandir(monkeypatch, "class_01")
    with pytest.raises(PermissionError, match=r"cannot read class folder .*class_01 \(permission denied\)"):
        scan_imagefolder(root, cache_dir=tmp_path / "c")


def test_check_image_verdicts(tmp_path):
    good = tmp_path / "good.JPEG"
    Image.fromarray(gradient_image(30, 40, 1)).save(good)
    gif = tmp_path / "anim.JPEG"
    Image.fromarray(gradient_image(30, 40, 1)).save(gif, format="GIF")
    broken = tmp_path / "broken.JPEG"
    write_undecodable_png(broken)
    empty = tmp_path / "empty.JPEG"
    empty.write_bytes(b"")
    assert check_image(str(good)) is None and check_image(str(good), full=True) is None
    assert check_image(str(gif)) == "unsupported image format GIF"
    assert check_image(str(broken)) is None  # the header is fine...
    assert "cannot decode" in check_image(str(broken), full=True)  # ...the pixels are not
    assert check_image(str(empty)) == "not an image file"
    assert check_image(str(tmp_path / "missing.JPEG")) is not None


def test_verdict_cache_rechecks_only_new_or_changed_files(dataset, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    scan_imagefolder(dataset.root, cache_dir=cache)
    checked = []
    real = imagefolder.check_image
    monkeypatch.setattr(imagefolder, "check_image", lambda p, full=False: checked.append(p) or real(p, full))
    train, _ = scan_imagefolder(dataset.root, cache_dir=cache)
    assert checked == []  # everything came from the cache, verdicts included
    assert {p for p, _ in train.skipped} == {str(p) for p in dataset.bad_files if "train" in p.name}
    target = dataset.root / "train" / "class_01" / "train_1_0000.JPEG"
    target.write_bytes(b"now garbage")  # a changed file is checked again
    train, _ = scan_imagefolder(dataset.root, cache_dir=cache)
    assert checked == [str(target)]
    assert str(target) in {p for p, _ in train.skipped}
    # full mode keeps its own verdicts
    checked.clear()
    scan_imagefolder(dataset.root, cache_dir=cache, mode="full")
    assert len(checked) == dataset.counts["train"] + dataset.counts["val"] + len(dataset.bad_files)


def test_damaged_cache_is_ignored(dataset, tmp_path):
    cache = tmp_path / "c"
    scan_imagefolder(dataset.root, cache_dir=cache)
    for f in cache.rglob("*.tsv.gz"):
        f.write_bytes(b"garbage")
    train, val = scan_imagefolder(dataset.root, cache_dir=cache)
    assert len(train) == dataset.counts["train"] and len(val) == dataset.counts["val"]


def test_unknown_validation_mode(dataset, tmp_path):
    with pytest.raises(ValueError, match="unknown validation mode"):
        scan_imagefolder(dataset.root, mode="quick", cache_dir=tmp_path / "c")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), world=st.integers(1, 8), seed=st.integers(0, 10**6), epoch=st.integers(0, 500))
def test_sharding_train_equal_disjoint_val_exactly_once(n, world, seed, epoch):
    def shards(shuffle):
        return [epoch_indices(n, rank=r, world_size=world, shuffle=shuffle, seed=seed, epoch=epoch)
                for r in range(world)]

    train = shards(True)
    assert all(len(t) == n // world == shard_size(n, rank=r, world_size=world, shuffle=True)
               for r, t in enumerate(train))
    flat = np.concatenate(train)
    assert len(np.unique(flat)) == len(flat) and (flat < n).all() and (flat >= 0).all()
    val = shards(False)
    assert np.array_equal(np.sort(np.concatenate(val)), np.arange(n))
    assert max(map(len, val)) - min(map(len, val)) <= 1


def test_sharding_is_a_function_of_seed_and_epoch():
    a = epoch_indices(100, rank=0, world_size=1, shuffle=True, seed=1, epoch=2)
    assert np.array_equal(a, epoch_indices(100, rank=0, world_size=1, shuffle=True, seed=1, epoch=2))
    assert not np.array_equal(a, epoch_indices(100, rank=0, world_size=1, shuffle=True, seed=1, epoch=3))
    assert not np.array_equal(a, epoch_indices(100, rank=0, world_size=1, shuffle=True, seed=2, epoch=2))
    assert num_batches(10, 4, True) == 2 and num_batches(10, 4, False) == 3
    with pytest.raises(ValueError, match="rank 2"):
        epoch_indices(10, rank=2, world_size=2, shuffle=False, seed=0, epoch=0)
