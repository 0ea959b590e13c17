"""Tests of dhm_fast.export: branch stripping, torchvision export, the export command (safetensors, stock
state dict, model card), release-checkpoint renaming."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from small_data import write_fashion_mnist
from torch import nn

from dhm_fast import __version__, checkpoint
from dhm_fast.cli import main as train_main
from dhm_fast.export import from_release, main, stock_network, strip_branches, to_torchvision
from dhm_fast.logbook import read_log
from dhm_fast.models import IMAGENET_ARCHS, MODEL_NAMES, create_model, param_counts

FAMILIES = [("resnet18", 32), ("resnet20", 16), ("wrn_16_8", 8), ("densenet_bc_100_12", 8)]


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default BN statistics and affine parameters, so a missed buffer changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=g)))
    return model


# ---------------------------------------------------------------------------- strip_branches


@pytest.mark.parametrize("arch, size", FAMILIES)
def test_strip_branches_equals_main_head(arch, size):
    torch.manual_seed(0)
    model = _randomize(create_model(arch, 6, dropout=0.2) if arch == "wrn_16_8" else create_model(arch, 6))
    model.eval()
    stripped = strip_branches(model)
    assert stripped.num_heads == 1 and stripped.head_names == ("main",)
    assert not stripped.training
    assert not [n for n in stripped.state_dict() if n.startswith("aux")]
    assert param_counts(stripped) == (param_counts(model)[1],) * 2
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), model(x), rtol=0, atol=0)
    # A copy, not a view: changing the stripped net leaves the original alone.
    first = next(iter(stripped.parameters()))
    with torch.no_grad():
        first.add_(1.0)
    assert not torch.equal(first, next(iter(model.parameters())))


def test_strip_branches_keeps_dtype_mode_options_and_unwraps_compile():
    model = create_model("wrn_16_8", 3, in_channels=1, dropout=0.3).to(torch.float64)
    stripped = strip_branches(torch.compile(model))
    assert stripped.training and next(iter(stripped.parameters())).dtype == torch.float64
    assert stripped.conv.in_channels == 1
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in stripped.modules())
    # A baseline model strips to an equal copy.
    base = strip_branches(stripped.eval())
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(base(x), stripped(x), rtol=0, atol=0)


def test_strip_branches_rejects_foreign_models():
    with pytest.raises(ValueError, match="create_model"):
        strip_branches(nn.Linear(2, 2))


# ---------------------------------------------------------------------------- to_torchvision


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_to_torchvision_gives_identical_outputs(arch):
    torch.manual_seed(0)
    model = _randomize(create_model(arch, 17)).eval()
    ref = getattr(torchvision.models, arch)(num_classes=17).eval()
    ref.load_state_dict(to_torchvision(model), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["resnet34", "resnet101", "resnet152"])
def test_to_torchvision_loads_strictly_for_the_deep_resnets(arch):
    with torch.device("meta"):
        model = create_model(arch, 1000)
        ref = getattr(torchvision.models, arch)(num_classes=1000)
    result = ref.load_state_dict(to_torchvision(model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_to_torchvision_rejects_other_archs_and_channels():
    with pytest.raises(ValueError, match="needs an ImageNet ResNet.*got 'resnet20'"):
        to_torchvision(create_model("resnet20", 10))
    with pytest.raises(ValueError, match="3 input channels"):
        to_torchvision(create_model("resnet18", 10, in_channels=1, method="baseline"))


# ---------------------------------------------------------------------------- python -m dhm_fast.export


def _export(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_trained_backbone_exports_to_the_stock_network_and_evaluates(tmp_path, capsys):
    data = write_fashion_mnist(tmp_path / "fm", n_train=32, n_test=16, side=16)
    common = ["--arch", "tv:resnet18", "--batch-size", "8", "--amp", "none", "--no-channels-last",
              "--data-dir", str(data)]
    run, out = tmp_path / "run", tmp_path / "export"
    assert train_main(common + ["--epochs", "2", "--lr", "0.05", "--out", str(run)]) == 0
    code, stdout, _ = _export(capsys, run / "best.pt", "--out", out)
    assert code == 0 and "model.safetensors" in stdout

    best = checkpoint.load(run / "best.pt")
    model = create_model("tv:resnet18", 10, in_channels=1)
    model.load_state_dict(best["model"])
    stock, call = stock_network("tv:resnet18", 10)
    assert call == "torchvision.models.get_model('resnet18', num_classes=10)"
    x = torch.randn(3, 1, 16, 16)
    for loaded in (load_file(out / "model.safetensors"), torch.load(out / "model.pt", weights_only=True)):
        stock.load_state_dict(loaded, strict=True)
        with torch.no_grad():  # the stripped trained network is exactly the stock one (gray repeated to RGB)
            torch.testing.assert_close(stock.eval()(x.expand(-1, 3, -1, -1)), strip_branches(model).eval()(x),
                                       rtol=0, atol=0)

    card = json.loads((out / "model.json").read_text())
    assert card["architecture"] == "tv:resnet18" and card["stock_constructor"] == call
    assert (card["recipe"], card["method"], card["epochs"], card["dataset"]) == (
        "fashion-mnist-resnet20", "dhm", 2, "fashion-mnist")
    assert card["fork_points"] == ["layer2", "layer3"] and card["num_classes"] == 10
    assert card["final_val_accuracy"] == read_log(run)[-1]["val"]["heads"]
    assert set(card["final_val_accuracy"]) == {"main", "aux1", "aux2"}
    assert card["exported_checkpoint"]["epochs_trained"] == best["epoch"] + 1
    assert card["version"] == __version__ and card["command"] == shlex.join(sys.orig_argv)
    assert card["git_commit"] == best["provenance"]["git_commit"]

    for name in ("model.safetensors", "model.pt"):  # --eval-only takes either exported file
        assert train_main(common + ["--eval-only", "--weights", str(out / name)]) == 0
        assert f"main  top-1 {best['top1']:6.2f}%" in capsys.readouterr().out


def _checkpoint(tmp_path, arch: str, in_channels: int = 3, **config) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = _randomize(create_model(arch, 7, in_channels=in_channels))
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "num_classes": 7, "epoch": 4,
                "config": {"arch": arch, "method": "dhm", "dataset": "imagenet", "image_size": 64, **config}}, path)
    return model, path


@pytest.mark.parametrize("arch, in_channels", [
    ("resnet18", 3),
    pytest.param("timm:resnet18", 1, marks=pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                                                 reason="timm is not installed")),
])
def test_the_paper_resnets_and_timm_models_export_too(tmp_path, capsys, arch, in_channels):
    model, path = _checkpoint(tmp_path, arch, in_channels)
    code, _, _ = _export(capsys, path, "--out", tmp_path / "out")
    assert code == 0
    stock, call = stock_network(arch, 7, in_channels)
    stock.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), strict=True)
    x = torch.randn(2, in_channels, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(x), model.eval()(x), rtol=0, atol=0)
    # written atomically: the three files and no temporary left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.json", "model.pt", "model.safetensors"]
    card = json.loads((tmp_path / "out" / "model.json").read_text())
    assert card["stock_constructor"] == call and card["command"] is None  # a checkpoint without provenance
    assert card["final_val_accuracy"] is None and card["exported_checkpoint"]["epochs_trained"] == 5


def test_unmappable_architectures_and_other_files_are_one_line_and_exit_2(tmp_path, capsys):
    _, path = _checkpoint(tmp_path, "resnet20")
    bare = tmp_path / "bare.pt"
    torch.save(create_model("resnet18", 3).state_dict(), bare)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for file, message in ((path, "resnet20 has no stock torchvision or timm constructor"),
                          (bare, "is not a dhm_fast checkpoint"), (junk, "is not a PyTorch checkpoint"),
                          (tmp_path, "is a folder, not a file")):
        code, _, err = _export(capsys, file, "--out", tmp_path / "out")
        assert code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    _, good = _checkpoint(tmp_path, "resnet18")
    code, _, err = _export(capsys, good, "--out", junk)
    assert code == 2 and f"--out {junk} is a file" in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------- from_release

# Ground truth: the state-dict keys and shapes of the authors' released models (one TSV per
# architecture, read off their model code; first line a comment naming the class count, then
# "key<TAB>shape" with shape "AxBx..." or "scalar"). Nothing here is derived from our renaming.
RELEASE_KEYS_DIR = Path(__file__).parent / "data" / "release_keys"
RELEASED_ARCHS = sorted(p.stem for p in RELEASE_KEYS_DIR.glob("*.tsv"))


@functools.cache
def release_keys(arch: str) -> tuple[int, dict[str, tuple[int, ...]]]:
    """(class count, released key -> shape) of one released architecture, in the release's order."""
    lines = (RELEASE_KEYS_DIR / f"{arch}.tsv").read_text().splitlines()
    classes = re.search(r"\((\d+) classes\)", lines[0])
    assert lines[0].startswith("#") and classes, lines[0]
    shapes = {}
    for line in lines[1:]:
        key, shape = line.split("\t")
        assert key not in shapes, key
        shapes[key] = () if shape == "scalar" else tuple(int(n) for n in shape.split("x"))
    return int(classes.group(1)), shapes


def released_state(arch: str, *, device: str = "meta", prefix: str = "module.", seed: int = 0,
                   drop: Callable[[str], bool] = lambda key: False) -> dict[str, torch.Tensor]:
    """A checkpoint in the release's naming and shapes (random values unless on the meta device)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (key, shape) in enumerate(release_keys(arch)[1].items()):
        if drop(key):
            continue
        if device == "meta":
            value = torch.empty(shape, device="meta", dtype=torch.long if key.endswith("tracked") else None)
        elif key.endswith("num_batches_tracked"):
            value = torch.tensor(1000 + i)  # distinct per key, so a test can tell counters apart
        else:
            value = torch.randn(shape, generator=g)
        state[prefix + key] = value
    return state


def test_release_key_files_cover_every_paper_architecture():
    # ResNet-20 and the re-ID networks are ours, not released
    assert set(RELEASED_ARCHS) == {n for n in MODEL_NAMES if not n.startswith("reid_")} - {"resnet20"}
    for arch in RELEASED_ARCHS:
        classes, shapes = release_keys(arch)
        assert classes == (1000 if arch in IMAGENET_ARCHS else 100)
        assert shapes["fc.weight"][0] == classes


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "resnet1202" else a
                                  for a in RELEASED_ARCHS])
def test_every_released_key_maps_one_to_one_onto_ours_with_its_shape(arch):
    classes, _ = release_keys(arch)
    release = released_state(arch)
    with torch.device("meta"):
        model = create_model(arch, classes)
    ours = model.state_dict()
    renamed = from_release(release)  # renaming alone: no filling-in of anything missing
    assert len(renamed) == len(release)  # no two released keys collapse onto one of ours
    assert sorted(set(renamed) - set(ours)) == []  # every released key is one of ours
    assert sorted(set(ours) - set(renamed)) == []  # every one of ours comes from the release
    wrong = {k: (tuple(v.shape), tuple(ours[k].shape)) for k, v in renamed.items() if v.shape != ours[k].shape}
    assert wrong == {}
    # Checked against the arch: the same tensors (not copies) under the same names, and a strict load.
    checked = from_release(release, arch=arch)
    assert {k: id(v) for k, v in checked.items()} == {k: id(v) for k, v in renamed.items()}
    model.load_state_dict(checked, strict=True)


@pytest.mark.parametrize("arch", ["resnet32", "densenet_40_12"])
def test_released_values_land_in_our_model(arch):
    classes, _ = release_keys(arch)
    release = released_state(arch, device="cpu", prefix="")
    model = create_model(arch, classes)
    model.load_state_dict(from_release(release, arch=arch), strict=True)
    ours = model.state_dict()
    # Each released tensor appears exactly once among ours (values are distinct random draws).
    unmatched = [k for k, v in release.items() if sum(torch.equal(v, w) for w in ours.values()
                                                      if w.shape == v.shape) != 1]
    assert unmatched == []
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 32, 32), all_heads=True)
    assert len(out) == 3 and all(o.shape == (1, classes) for o in out)


def test_from_release_accepts_unprefixed_and_checkpoint_dicts():
    prefixed = list(from_release(released_state("resnet32")))
    assert list(from_release(released_state("resnet32", prefix=""))) == prefixed
    assert list(from_release({"state_dict": released_state("resnet32"), "epoch": 3})) == prefixed


def test_from_release_baseline_checkpoint():
    # A baseline run of the release saves the trunk only.
    release = released_state("densenet_40_12", drop=lambda key: "_head" in key)
    converted = from_release(release, arch="densenet_40_12")
    with torch.device("meta"):
        create_model("densenet_40_12", 100, method="baseline").load_state_dict(converted, strict=True)


def test_from_release_fills_missing_batch_counters():
    # Checkpoints from PyTorch < 0.4.1 have no num_batches_tracked buffers.
    old = released_state("resnet32", device="cpu", drop=lambda key: key.endswith("num_batches_tracked"))
    old["module.conv1.weight"] = torch.randn(16, 1, 3, 3)  # a grayscale model: channels read from the weights
    converted = from_release(old, arch="resnet32")
    assert converted["aux1.layer3.0.bn1.num_batches_tracked"].dtype == torch.long
    create_model("resnet32", 100, in_channels=1).load_state_dict(converted, strict=True)


def test_from_release_unknown_key_is_named():
    release = released_state("resnet32")
    release["module.layer3_head3.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected key 'module\.layer3_head3\.0\.conv1\.weight'"):
        from_release(release)
    with pytest.raises(ValueError, match="unexpected key 'classifier.weight'"):
        from_release({"classifier.weight": torch.zeros(1)})


def test_from_release_checks_against_arch():
    with pytest.raises(ValueError, match="unexpected key 'layer1.5.conv1.weight' for arch 'resnet32'"):
        from_release(released_state("resnet110"), arch="resnet32")
    with pytest.raises(ValueError, match="lacks 'layer1.2.conv1.weight'"):
        from_release(released_state("resnet32", drop=lambda key: key.startswith("layer1.2.conv1")), arch="resnet32")
    bad = released_state("resnet32")
    bad["module.fc_head1.weight"] = torch.zeros(100, 64)
    with pytest.raises(ValueError, match=r"shape of 'aux1.fc.weight' is \(100, 64\)"):
        from_release(bad, arch="resnet32")
    with pytest.raises(ValueError, match="unknown arch 'resnet21'"):
        from_release(released_state("resnet32"), arch="resnet21")
