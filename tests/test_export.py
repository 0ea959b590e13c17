"""Tests of dhm_fast.export: branch stripping, torchvision export, release-checkpoint renaming."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

from dhm_fast.export import from_release, strip_branches, to_torchvision
from dhm_fast.models import create_model, param_counts

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


def to_release_naming(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of from_release: ``aux2.layer3.0.conv1.weight`` -> ``module.layer3_head2.0.conv1.weight``."""
    out = {}
    for key, value in state.items():
        match = re.match(r"^aux([12])\.([a-z0-9]+)\.(.+)$", key)
        new = f"{match.group(2)}_head{match.group(1)}.{match.group(3)}" if match else key
        out["module." + new] = value
    return out


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


# ---------------------------------------------------------------------------- from_release

# Names read from the authors' release, one per branch stage kind and family.
RELEASE_KEYS = {
    "resnet18": [
        "layer3_head2.0.downsample.0.weight",
        "layer4_head2.1.bn2.running_var",
        "fc_head2.bias",
        "layer4_head1.1.conv2.weight",
        "fc_head1.weight",
        "layer4.1.bn2.weight",
    ],
    "resnet20": [
        "layer2_head2.0.conv1.weight",
        "layer3_head2.1.bn2.bias",
        "layer3_head1.2.conv2.weight",
        "fc_head1.weight",
        "layer3.2.bn2.running_mean",
    ],
    "wrn_16_8": [
        "conv.weight",
        "layer2_head2.0.shortcut.weight",
        "bn_head2.weight",
        "layer3_head1.1.bn1.weight",
        "bn_head1.running_mean",
        "fc_head1.weight",
        "bn.bias",
    ],
    "densenet_bc_100_12": [
        "transition2_head2.conv.weight",
        "layer3_head2.15.conv2.weight",
        "layer3_head1.31.bn1.weight",
        "bn_head1.weight",
        "transition1.bn.weight",
    ],
}


@pytest.mark.parametrize("arch", sorted(RELEASE_KEYS))
@pytest.mark.parametrize("check_arch", [False, True])
def test_from_release_round_trip(arch, check_arch):
    torch.manual_seed(0)
    model = _randomize(create_model(arch, 10))
    ours = model.state_dict()
    release = to_release_naming(ours)
    for key in RELEASE_KEYS[arch]:
        assert "module." + key in release
    converted = from_release(release, arch=arch if check_arch else None)
    assert list(converted) == list(ours)
    fresh = create_model(arch, 10)
    fresh.load_state_dict(converted, strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, ours[key]), key


def test_from_release_accepts_unprefixed_and_checkpoint_dicts():
    ours = create_model("resnet20", 10).state_dict()
    release = {k.removeprefix("module."): v for k, v in to_release_naming(ours).items()}
    assert list(from_release(release)) == list(ours)
    assert list(from_release({"state_dict": release, "epoch": 3})) == list(ours)


def test_from_release_baseline_checkpoint():
    ours = create_model("densenet_40_12", 10, method="baseline").state_dict()
    converted = from_release(to_release_naming(ours), arch="densenet_40_12")
    create_model("densenet_40_12", 10, method="baseline").load_state_dict(converted, strict=True)


def test_from_release_fills_missing_batch_counters():
    # Checkpoints from PyTorch < 0.4.1 have no num_batches_tracked buffers.
    ours = create_model("resnet20", 10, in_channels=1).state_dict()
    old = {k: v for k, v in to_release_naming(ours).items() if not k.endswith("num_batches_tracked")}
    converted = from_release(old, arch="resnet20")
    assert converted["aux1.layer3.0.bn1.num_batches_tracked"].dtype == torch.long
    create_model("resnet20", 10, in_channels=1).load_state_dict(converted, strict=True)


def test_from_release_unknown_key_is_named():
    release = to_release_naming(create_model("resnet20", 10).state_dict())
    release["module.layer3_head3.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected key 'module\.layer3_head3\.0\.conv1\.weight'"):
        from_release(release)
    with pytest.raises(ValueError, match="unexpected key 'classifier.weight'"):
        from_release({"classifier.weight": torch.zeros(1)})


def test_from_release_checks_against_arch():
    release = to_release_naming(create_model("resnet20", 10).state_dict())
    with pytest.raises(ValueError, match="unexpected key 'layer1.3.conv1.weight' for arch 'resnet20'"):
        from_release(to_release_naming(create_model("resnet32", 10).state_dict()), arch="resnet20")
    with pytest.raises(ValueError, match="lacks 'layer1.2.conv1.weight'"):
        from_release({k: v for k, v in release.items() if "layer1.2.conv1" not in k}, arch="resnet20")
    bad = dict(release)
    bad["module.fc_head1.weight"] = torch.zeros(10, 64)
    with pytest.raises(ValueError, match=r"shape of 'aux1.fc.weight' is \(10, 64\)"):
        from_release(bad, arch="resnet20")
    with pytest.raises(ValueError, match="unknown arch 'resnet21'"):
        from_release(release, arch="resnet21")
