"""Market-1501 / DukeMTMC-reID folders: identities, cameras, junk and distractors, bad files, missing folders."""

import shutil
from pathlib import Path

import pytest
import torch

from pipelines import LoaderConfig, create_loaders
from pipelines.reid_sample import write_reid_sample


def loaders(root, dataset="market1501", **options):
    config = LoaderConfig(dataset=dataset, data_dir=root and str(root), batch_size=8, image_size=32, num_workers=0,
                          **options)
    return create_loaders(config)


@pytest.fixture
def market(tmp_path):
    return write_reid_sample(tmp_path / "market")


def test_identities_cameras_junk_and_distractors(market):
    for name in ("0000_c1s1_000100_00.jpg", "-1_c2s1_000101_00.jpg"):  # no identity: never a training class
        shutil.copy(next((market / "bounding_box_train").iterdir()), market / "bounding_box_train" / name)
    train, test = loaders(market)
    assert (train.num_classes, train.num_samples) == (6, 6 * 3 * 2)
    assert sorted(set(train.labels.tolist())) == list(range(6))  # ids 1..6 relabelled 0..5
    q = test.num_query
    assert q == 4 * 3 and test.pids[:q].tolist() == [7, 7, 7, 8, 8, 8, 9, 9, 9, 10, 10, 10]
    assert test.camids[:q].tolist() == [1, 2, 3] * 4
    gallery = test.pids[q:].tolist()
    assert -1 not in gallery and gallery.count(0) == 3  # junk left out, distractors kept
    assert test.num_samples == q + 4 * 3 * 2 + 3
    images, index = next(iter(test))
    assert images.shape == (8, 3, 32, 16) and index.tolist() == list(range(8))  # height x height / 2
    train.set_epoch(0)
    images, labels = next(iter(train))
    assert images.shape == (8, 3, 32, 16) and images.dtype == torch.float32 and labels.max() < 6


def test_duke_names_and_the_release_subfolder(tmp_path):
    write_reid_sample(tmp_path / "DukeMTMC-reID", style="dukemtmc")
    train, test = loaders(tmp_path, dataset="dukemtmc")
    assert train.num_classes == 6 and test.num_query == 12 and 0 not in test.pids.tolist()
    with pytest.raises(ValueError, match="market1501 folder .* has no bounding_box_train/, query/, bounding_box_test/"):
        loaders(tmp_path, dataset="market1501")  # Duke's folder is no Market release


def test_bad_names_and_images_are_skipped_and_reported_or_stop_a_strict_run(market):
    bad_name = market / "bounding_box_train" / "0001_c1_f0000001.jpg"  # a Duke name in Market
    shutil.copy(next((market / "bounding_box_train").iterdir()), bad_name)
    broken = market / "bounding_box_test" / "0007_c1s1_999999_00.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    (market / "query" / "Thumbs.db").write_bytes(b"\0" * 10)  # ignored: not an image file
    train, test = loaders(market)
    assert train.skipped == [(str(bad_name), "not a market1501 image name")]
    assert [path for path, _ in test.skipped] == [str(broken)] and "cannot decode" in test.skipped[0][1]
    assert train.num_samples == 36 and test.num_samples == 12 + 27
    with pytest.raises(ValueError, match=f"^bad image {bad_name}: not a market1501 image name \\(--strict-data\\)$"):
        loaders(market, strict_data=True)
    bad_name.unlink()
    with pytest.raises(ValueError, match=f"^bad image {broken}: cannot decode"):
        loaders(market, strict_data=True)


def test_missing_or_empty_folders_are_one_line_errors(market, tmp_path):
    shutil.rmtree(market / "query")
    with pytest.raises(ValueError, match=r"^market1501 folder .* has no query/ folder$"):
        loaders(market)
    (market / "query").mkdir()
    with pytest.raises(ValueError, match=r"query has no usable market1501 images$"):
        loaders(market)
    with pytest.raises(ValueError, match="--data-dir is required"):
        loaders(None)
    with pytest.raises(ValueError, match="--loader dali does not apply"):
        loaders(tmp_path, backend="dali")


def test_an_unreadable_split_folder_is_one_line(market, monkeypatch):
    # Simulated: the machines here run as root, which chmod cannot stop from reading.
    real = Path.iterdir

    def iterdir(self):
        if self.name == "query":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(PermissionError, match=r"^cannot read market1501 folder \S+/query \(permission denied\)$"):
        loaders(market)
