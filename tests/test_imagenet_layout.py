"""ImageNet as downloaded: a flat val/ labelled by either form of the ground truth, the devkit's class
check, one-line errors naming the bad entry, and the training tars."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from imagenet_folder import IDS, META, WNIDS, write_ground_truth, write_tiny_imagenet

from pipelines.imagefolder import scan_imagefolder
from pipelines.imagenet_layout import read_mat_struct

PLAIN_META = META.parent / "devkit_meta_tiny_plain.mat"


@pytest.mark.parametrize("meta", [META, PLAIN_META])
def test_the_mat_reader_reads_the_devkit_synsets_compressed_or_not(meta):
    synsets = read_mat_struct(meta.read_bytes(), "synsets")
    assert [(int(s["ILSVRC2012_ID"]), s["WNID"], int(s["num_children"])) for s in synsets] == [
        (1, "n02000002", 0), (2, "n01000001", 0), (3, "n03000003", 0), (4, "n00000000", 3)]
    assert synsets[3]["words"] == "entity" and synsets[0]["children"] is None


@pytest.mark.parametrize("form", ["devkit", "devkit-tar", "loc"])
def test_a_flat_val_gets_the_ground_truth_in_sorted_wnid_order(tmp_path, form):
    data = write_tiny_imagenet(tmp_path / "in", form=form)
    train, val = scan_imagefolder(data.root, cache_dir=tmp_path / "c")
    assert train.classes == val.classes == WNIDS  # devkit IDs 1, 2, 3 are not in this order
    assert [Path(f).name for f in val.files] == sorted(data.val_truth)
    assert [WNIDS[label] for label in val.labels] == [data.val_truth[n] for n in sorted(data.val_truth)]
    assert [WNIDS[label] for label in train.labels] == [Path(f).parent.name for f in train.files]


def test_an_explicit_val_labels_path_is_used(tmp_path):
    data = write_tiny_imagenet(tmp_path / "in", form="none")
    with pytest.raises(ValueError, match="no class folders.*--val-labels"):
        scan_imagefolder(data.root, cache_dir=tmp_path / "c")
    elsewhere = tmp_path / "labels"
    elsewhere.mkdir()
    csv = write_ground_truth(elsewhere, data.val_truth, "loc")
    _, val = scan_imagefolder(data.root, cache_dir=tmp_path / "c", val_labels=str(csv))
    assert [WNIDS[label] for label in val.labels] == [data.val_truth[n] for n in sorted(data.val_truth)]


def _csv_line_of(csv: Path, stem: str) -> int:
    return next(i for i, line in enumerate(csv.read_text().splitlines(), start=1) if line.startswith(stem))


def test_loc_csv_errors_name_the_line(tmp_path):
    data = write_tiny_imagenet(tmp_path / "in", form="loc")
    csv = data.labels
    (data.root / "val" / "ILSVRC2012_val_00000002.JPEG").unlink()
    line = _csv_line_of(csv, "ILSVRC2012_val_00000002")
    with pytest.raises(ValueError, match=rf"^{csv} line {line}: ILSVRC2012_val_00000002 is not a file in .*val$"):
        scan_imagefolder(data.root, cache_dir=tmp_path / "c")
    csv.write_text(csv.read_text().replace("ILSVRC2012_val_00000002,n0", "ILSVRC2012_val_00000002,n9"))
    with pytest.raises(ValueError, match=rf"line {line}: unknown wnid n9\d+ for ILSVRC2012_val_00000002"):
        scan_imagefolder(data.root, cache_dir=tmp_path / "c")


def test_devkit_errors_name_the_line_or_the_file(tmp_path):
    data = write_tiny_imagenet(tmp_path / "in", form="devkit")
    truth = data.labels / "data" / "ILSVRC2012_validation_ground_truth.txt"
    extra = data.root / "val" / "ILSVRC2012_val_00000099.JPEG"
    shutil.copy(data.root / "val" / "ILSVRC2012_val_00000001.JPEG", extra)
    with pytest.raises(ValueError, match=rf"^{extra} has no ground truth in .* \(1 such file\(s\)\)$"):
        scan_imagefolder(data.root, cache_dir=tmp_path / "c")
    extra.unlink()
    (data.root / "val" / "ILSVRC2012_val_00000004.JPEG").unlink()
    with pytest.raises(ValueError, match=r"line 4: ILSVRC2012_val_00000004 is not a file in"):
        scan_imagefolder(data.root, cache_dir=tmp_path / "c")
    truth.write_text("1\n7\n")
    with pytest.raises(ValueError, match=r"ground_truth.txt\) line 2: unknown ILSVRC2012_ID '7'"):
        scan_imagefolder(data.root, cache_dir=tmp_path / "c")


def test_train_classes_must_be_the_devkit_classes(tmp_path):
    data = write_tiny_imagenet(tmp_path / "in", form="devkit")
    (data.root / "train" / WNIDS[0]).rename(data.root / "train" / "n05555555")
    with pytest.raises(ValueError, match=r"differ from the 3 classes of .*1 unknown \(e.g. \['n05555555'\]\), "
                                         rf"1 missing \(e.g. \['{WNIDS[0]}'\]\)"):
        scan_imagefolder(data.root, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("outer", [False, True])
def test_training_tars_are_named_then_extracted_by_one_command(tmp_path, outer):
    data = write_tiny_imagenet(tmp_path / "in", form="loc", train_tars=True)
    train_dir = data.root / "train"
    with pytest.raises(ValueError, match=r"holds 3 per-class tar file\(s\).*: python -m pipelines.imagenet_layout "
                                         rf"extract-train {train_dir}$"):
        scan_imagefolder(data.root, cache_dir=tmp_path / "c")
    source = train_dir
    if outer:  # ILSVRC2012_img_train.tar as downloaded: a tar of the per-class tars
        source = tmp_path / "ILSVRC2012_img_train.tar"
        with tarfile.open(source, "w") as tar:
            for f in sorted(train_dir.glob("*.tar")):
                tar.add(f, arcname=f.name)
                f.unlink()
    args = [sys.executable, "-m", "pipelines.imagenet_layout", "extract-train", str(source), "--out", str(train_dir)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    assert "extracted 3 class(es)" in done.stdout
    assert [line.split(": ") for line in done.stdout.splitlines()[:3]] == [[f"[{i + 1}] {w}", "4 files"]
                                                                          for i, w in enumerate(WNIDS)]
    train, _ = scan_imagefolder(data.root, cache_dir=tmp_path / "c")
    assert sorted(Path(f).name for f in train.files) == sorted(f"{w}_{i}.JPEG" for w in IDS for i in range(4))
    again = subprocess.run(args, capture_output=True, text=True, check=True)  # already done: nothing to redo
    assert "extracted 0 class(es)" in again.stdout


def test_extract_train_names_what_it_cannot_extract(tmp_path):
    def refusal(source):
        result = subprocess.run([sys.executable, "-m", "pipelines.imagenet_layout", "extract-train", str(source)],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "extracted" not in result.stdout, (result.stdout, result.stderr)
        return result.stderr.strip()

    data = write_tiny_imagenet(tmp_path / "in", form="loc", train_tars=True)
    # the dataset root instead of its train/: nothing extracted is an error, not "extracted 0 class(es)"
    assert refusal(data.root) == (f"error: {data.root}: no per-class .tar files in it "
                                  "(give train/ or ILSVRC2012_img_train.tar)")
    broken = data.root / "train" / f"{WNIDS[1]}.tar"
    broken.write_bytes(b"\0" * 100)
    assert refusal(data.root / "train") == (f"error: {data.root / 'train'}: {WNIDS[1]}.tar is not a readable tar "
                                            "(truncated header)")
    assert (data.root / "train" / WNIDS[0]).is_dir() and not (data.root / "train" / WNIDS[1]).exists()
    outer = tmp_path / "ILSVRC2012_img_train.tar"
    outer.write_bytes(b"not a tar at all")
    assert refusal(outer).startswith(f"error: {outer}: not a readable tar (")


def test_a_devkit_near_a_class_folder_subset_is_left_alone_unless_named(tmp_path):
    data = write_tiny_imagenet(tmp_path / "in", form="devkit")
    for name, wnid in data.val_truth.items():  # val/<wnid>/ folders, as a prepared subset has them
        (data.root / "val" / wnid).mkdir(exist_ok=True)
        (data.root / "val" / name).rename(data.root / "val" / wnid / name)
    for split in ("train", "val"):
        shutil.rmtree(data.root / split / WNIDS[2], ignore_errors=True)
    train, _ = scan_imagefolder(data.root, cache_dir=tmp_path / "c")
    assert train.classes == WNIDS[:2]
    with pytest.raises(ValueError, match=r"differ from the 3 classes of .*0 unknown .*1 missing"):
        scan_imagefolder(data.root, cache_dir=tmp_path / "c", val_labels=str(data.labels))
