"""ImageFolder -> .beton conversion (pipelines.ffcv_convert) and the checks on .beton files."""

from __future__ import annotations

import numpy as np
import pytest
from imagenet_folder import WNIDS, write_tiny_imagenet
from PIL import Image
from pipeline_helpers import require_extra, small_config, write_undecodable_png

from pipelines.imagefolder import scan_imagefolder
from pipelines.sample_data import write_imagefolder

require_extra("ffcv", "FFCV")

from ffcv.pipeline.compiler import Compiler  # noqa: E402

from pipelines.ffcv import FfcvLoader, beton_labels, check_beton, read_classes  # noqa: E402
from pipelines.ffcv_convert import convert, main, page_size_for  # noqa: E402

Compiler.set_enabled(False)
TINY_PAGE = 1 << 21  # FFCV's smallest page keeps test files small


@pytest.fixture(autouse=True)
def private_validation_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # keep ~/.cache clean


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("conv"), num_classes=3, train_per_class=4,
                             val_per_class=3, min_side=40, max_side=140, seed=4)


def _sizes(files):
    out = []
    for f in files:
        with Image.open(f) as img:
            out.append((img.height, img.width))
    return out


@pytest.mark.parametrize("write_mode,expected_mode", [("raw", 1), ("jpg", 0), ("proportion", None),
                                                      ("smart", None)])
def test_round_trip_keeps_labels_sizes_and_order(dataset, tmp_path, write_mode, expected_mode):
    written = convert(str(dataset.root), str(tmp_path / "out"), write_mode=write_mode, num_workers=1,
                      page_size=TINY_PAGE, smart_threshold=20_000)
    train, val = scan_imagefolder(dataset.root, cache_dir=tmp_path / "c")
    assert read_classes(written["train"]) == dataset.classes
    for split, images in (("train", train), ("val", val)):
        reader = check_beton(written[split])
        assert reader.num_samples == len(images)
        assert np.array_equal(beton_labels(reader), images.labels)
        meta = reader.metadata["f0"]
        stored = [(int(h), int(w)) for h, w in zip(meta["height"], meta["width"], strict=True)]
        assert stored == _sizes(images.files)
        if expected_mode is not None:
            assert set(meta["mode"].tolist()) == {expected_mode}
        else:
            assert set(meta["mode"].tolist()) <= {0, 1}
        if write_mode == "smart":  # only images above the threshold (bytes of raw pixels) are JPEG
            big = meta["height"].astype(int) * meta["width"].astype(int) * 3 > 20_000
            assert np.array_equal(meta["mode"] == 0, big)


def test_max_resolution_caps_the_longer_side(dataset, tmp_path):
    written = convert(str(dataset.root), str(tmp_path / "out"), max_resolution=64, write_mode="jpg",
                      jpeg_quality=80, num_workers=1, page_size=TINY_PAGE, splits=("val",))
    assert set(written) == {"val"}
    _, val = scan_imagefolder(dataset.root, cache_dir=tmp_path / "c")
    meta = check_beton(written["val"]).metadata["f0"]
    for (h, w), mh, mw in zip(_sizes(val.files), meta["height"], meta["width"], strict=True):
        if max(h, w) <= 64:
            assert (mh, mw) == (h, w)
        else:
            assert max(mh, mw) == 64 and abs(mw / mh - w / h) < 0.05 * w / h + 2 / min(mh, mw)


def test_raw_pixels_round_trip_exactly(tmp_path):
    # Constant-size images decode with FFCV's simplest decoder: the raw bytes must be the RGB pixels.
    ds = write_imagefolder(tmp_path / "d", num_classes=2, train_per_class=2, val_per_class=2,
                           sizes=[(24, 36)], odd_files=False)
    written = convert(str(ds.root), str(tmp_path / "out"), write_mode="raw", num_workers=1,
                      page_size=TINY_PAGE, splits=("val",))
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(written["val"]), batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": None})
    (images,) = next(iter(loader))
    _, val = scan_imagefolder(ds.root, cache_dir=tmp_path / "c")
    for img, path in zip(images.numpy(), val.files, strict=True):
        with Image.open(path) as ref:
            assert np.array_equal(img, np.asarray(ref.convert("RGB")))


def test_bad_files_are_left_out_and_strict_stops(dataset, tmp_path):
    written = convert(str(dataset.root), str(tmp_path / "out"), write_mode="jpg", num_workers=1,
                      page_size=TINY_PAGE)
    n_val = check_beton(written["val"]).num_samples
    assert n_val == dataset.counts["val"]  # garbage and truncated files are not in the .beton
    with pytest.raises(ValueError, match=r"bad image .*garbage"):
        convert(str(dataset.root), str(tmp_path / "strict"), strict=True, num_workers=1, page_size=TINY_PAGE)


def test_a_file_failing_only_at_decode_fails_the_conversion_by_name(tmp_path):
    ds = write_imagefolder(tmp_path / "d", num_classes=2, train_per_class=2, val_per_class=2, odd_files=False)
    write_undecodable_png(ds.root / "val" / "class_01" / "zz_broken.JPEG")
    with pytest.raises(ValueError, match=r"zz_broken\.JPEG.*--validation full"):
        convert(str(ds.root), str(tmp_path / "out"), num_workers=1, page_size=TINY_PAGE, splits=("val",))
    assert not (tmp_path / "out" / "val.beton").exists()  # no half-written file left behind
    written = convert(str(ds.root), str(tmp_path / "out"), num_workers=1, page_size=TINY_PAGE,
                      splits=("val",), validation="full")
    assert check_beton(written["val"]).num_samples == 4


def test_beton_with_other_fields_is_a_one_line_error(tmp_path):
    from ffcv.fields import FloatField, IntField
    from ffcv.writer import DatasetWriter

    path = tmp_path / "other.beton"
    writer = DatasetWriter(str(path), {"x": FloatField(), "label": IntField()}, num_workers=1,
                           page_size=TINY_PAGE)
    writer.from_indexed_dataset([(0.5, 1), (1.5, 0)])
    expected = r"written with other fields \(x:FloatField, label:IntField\)"
    with pytest.raises(ValueError, match=expected) as info:
        check_beton(path)
    assert "\n" not in str(info.value)
    cfg = small_config(tmp_path, tmp_path / "c", backend="ffcv", train_beton=str(path), val_beton=str(path))
    with pytest.raises(ValueError, match="other fields"):
        FfcvLoader(path, cfg, train=True)


def test_missing_or_foreign_beton(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_beton(tmp_path / "none.beton")
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable FFCV .beton"):
        check_beton(junk)


def test_cli_writes_files_and_reports_errors_in_one_line(dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["--data-dir", str(dataset.root), "--out", str(out), "--max-resolution", "96",
               "--jpeg-quality", "85", "--write-mode", "proportion", "--num-workers", "1",
               "--page-size", str(TINY_PAGE)])
    assert rc == 0
    assert (out / "train.beton").is_file() and (out / "val.beton").is_file()
    assert "train:" in capsys.readouterr().out
    assert main(["--data-dir", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not exist" in err and "\n" not in err
    assert main(["--data-dir", str(dataset.root), "--out", str(out), "--jpeg-quality", "0",
                 "--cache-dir", str(tmp_path / "vc")]) == 2


def test_a_flat_val_is_labelled_by_the_ground_truth_named_with_val_labels(tmp_path, capsys):
    tiny = write_tiny_imagenet(tmp_path / "imagenet", form="loc")
    labels = tmp_path / "elsewhere" / "LOC_val_solution.csv"  # not in or above the data folder
    labels.parent.mkdir()
    tiny.labels.rename(labels)
    common = ["--data-dir", str(tiny.root), "--num-workers", "1", "--page-size", str(TINY_PAGE),
              "--cache-dir", str(tmp_path / "vc")]
    assert main([*common, "--out", str(tmp_path / "no")]) == 2  # a flat val/ without its ground truth
    assert "\n" not in capsys.readouterr().err.strip()
    assert main([*common, "--out", str(tmp_path / "out"), "--val-labels", str(labels)]) == 0
    val = check_beton(tmp_path / "out" / "val.beton")
    expected = [WNIDS.index(wnid) for _, wnid in sorted(tiny.val_truth.items())]
    assert beton_labels(val).tolist() == expected


def test_page_size_fits_the_largest_raw_image():
    assert page_size_for(None, "raw") == 8 << 20
    assert page_size_for(4000, "raw") >= 4000 * 4000 * 3
    assert page_size_for(4000, "jpg") == 8 << 20
