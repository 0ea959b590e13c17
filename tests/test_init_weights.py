"""--init-weights: torchvision weights into the paper's ResNets (and our own files), refusals as one line."""

from __future__ import annotations

import importlib.util
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from dhm_fast.cli import main
from dhm_fast.errors import UserError
from dhm_fast.export import strip_branches
from dhm_fast.init_weights import load_init_weights, read_weights
from dhm_fast.models import backbones, create_model


def _torchvision(arch: str, num_classes: int = 1000) -> torch.nn.Module:
    torch.manual_seed(1)
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    with torch.no_grad():  # non-default BN statistics, so a missed buffer shows in the outputs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "checkpoint"])
def test_torchvision_weights_fill_the_trunk_and_the_report_names_the_rest(tmp_path, fmt):
    stock = _torchvision("resnet18")
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(stock.state_dict(), path)
    else:
        torch.save(stock.state_dict() if fmt == "pt" else {"model": stock.state_dict()}, path)
    model = create_model("resnet18", 10, method="dhm")
    report = load_init_weights(model, path)
    own = model.state_dict()
    for key, value in stock.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key
    assert sorted(report.unused) == ["fc.bias", "fc.weight"]  # 1000 classes: not this model's classifier
    assert {k.split(".")[0] for k in report.missing} == {"fc", "aux1", "aux2"}
    lines = report.lines()
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert "fc (2 tensors)" in lines[2] and "aux1 (" in lines[1] and "aux2 (" in lines[1]


def test_same_class_count_gives_torchvision_outputs_exactly(tmp_path):
    stock = _torchvision("resnet18", num_classes=7)
    model = create_model("resnet18", 7, method="dhm")
    report = load_init_weights(model, {"module." + k: v for k, v in stock.state_dict().items()})
    assert report.unused == [] and {k.split(".")[0] for k in report.missing} == {"aux1", "aux2"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(strip_branches(model).eval()(x), stock(x), rtol=0, atol=0)


def test_a_dhm_checkpoint_initialises_another_run_completely(tmp_path):
    source = create_model("resnet20", 10)
    torch.save({"model": source.state_dict()}, tmp_path / "best.pt")
    target = create_model("resnet20", 10)
    report = load_init_weights(target, tmp_path / "best.pt")
    assert report.missing == [] and report.unused == []
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


@pytest.mark.parametrize("arch", [
    "tv:mobilenet_v3_small",
    pytest.param("timm:resnet18", marks=pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                                           reason="timm is not installed")),
])
def test_stock_weights_load_straight_into_a_backbone_trunk(arch):
    torch.manual_seed(1)
    stock = backbones.stock_constructor(arch)(1000).state_dict()
    model = create_model(arch, 10)
    report = load_init_weights(model, stock)
    head = {k for k, v in stock.items() if v.shape != model.state_dict()["trunk." + k].shape}
    assert head and sorted(report.unused) == sorted("trunk." + k for k in head)  # the 1000-class classifier
    for key, value in stock.items():
        if key not in head:
            assert torch.equal(model.state_dict()["trunk." + key], value), key
    lines = report.lines()
    assert f"{next(iter(head)).split('.')[0]} ({len(head)} tensors), aux1 (" in lines[1]
    assert lines[2].endswith(f"{next(iter(head)).split('.')[0]} ({len(head)} tensors)")


class _Evil:
    def __reduce__(self):
        return (print, ("ran code",))


@pytest.mark.parametrize("content, message", [
    ([torch.zeros(1)], "not a dhm_fast checkpoint"),
    ({"epoch": 3}, "holds no state dict"),
    ({}, "holds no state dict"),
    (b"not a torch file", "is not a PyTorch checkpoint"),
    (_Evil(), "refusing to load"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": broken", "not a readable safetensors file"),
])
def test_a_file_that_is_not_a_state_dict_is_one_line(tmp_path, content, message):
    path = tmp_path / "w.bin"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, _Evil):
        path.write_bytes(pickle.dumps(content))
    else:
        torch.save(content, path)
    with pytest.raises(UserError, match=message) as info:
        read_weights(path)
    assert "\n" not in str(info.value)


def test_mismatching_shapes_or_no_shared_tensor_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"'conv1.weight' has shape \(64, 3, 7, 7\).*\(64, 1, 7, 7\)"):
        load_init_weights(create_model("resnet18", 10, in_channels=1), _torchvision("resnet18").state_dict())
    with pytest.raises(UserError, match="shares no tensor"):
        load_init_weights(create_model("resnet20", 10), {"features.0.weight": torch.zeros(3)})


def test_the_command_line_refuses_a_bad_file_before_reading_data(tmp_path, capsys):
    bad = tmp_path / "w.pt"
    torch.save({"epoch": 1}, bad)
    for path, message in ((tmp_path / "absent.pt", "does not exist"), (bad, "holds no state dict")):
        code = main(["--init-weights", str(path), "--data-dir", str(tmp_path / "no-data"), "--device", "cpu",
                     "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and "\n" not in err
