"""Tests of dhm_fast.models: registry, exact parameter counts, heads, branch skipping, layouts."""

from __future__ import annotations

import copy
import functools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from dhm_fast.models import MODEL_NAMES, create_model, param_counts

# (classes, total with both branches, trunk alone) of the authors' released architectures.
RELEASE_COUNTS = {
    "resnet18": (1000, 53_483_512, 11_689_512),
    "resnet34": (1000, 84_831_480, 21_797_672),
    "resnet50": (1000, 100_523_000, 25_557_032),
    "resnet101": (1000, 129_569_784, 44_549_160),
    "resnet152": (1000, 151_916_536, 60_192_808),
    "resnet32": (100, 2_147_644, 470_004),
    "resnet110": (100, 7_770_108, 1_733_812),
    "resnet1202": (100, 87_652_092, 19_427_124),
    "wrn_16_8": (100, 47_874_556, 11_007_540),
    "wrn_28_10": (100, 164_146_364, 36_536_884),
    "densenet_40_12": (100, 3_749_364, 1_060_132),
    "densenet_100_12": (100, 23_776_604, 7_084_852),
    "densenet_bc_100_12": (100, 6_342_864, 800_032),
}
IMAGENET = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Small enough to run forward + backward on 2 CPU cores: (arch, input size).
SMALL = [
    ("resnet18", 64),
    ("resnet50", 32),
    ("resnet20", 32),
    ("resnet32", 16),
    ("wrn_16_8", 16),
    ("densenet_40_12", 16),
    ("densenet_bc_100_12", 16),
]
# One of each family for the behavioural tests (small inputs: 2 CPU cores).
FAMILIES = [("resnet18", 32), ("resnet20", 16), ("wrn_16_8", 8), ("densenet_40_12", 8)]
# Trunk module whose output each branch must receive: (shallow fork -> aux2, deep fork -> aux1).
FORKS = {
    "resnet18": ("layer2", "layer3"),
    "resnet20": ("layer1", "layer2"),
    "wrn_16_8": ("layer1", "layer2"),
    "densenet_40_12": ("transition1", "transition2"),
}


@functools.cache
def _cached(arch: str, method: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(arch, 5, method=method)


def _fresh(arch: str, method: str = "dhm") -> nn.Module:
    """A new 5-class model (a copy of a cached one: random init of the big nets is slow)."""
    return copy.deepcopy(_cached(arch, method)).train()


def _heads(model: nn.Module, x: torch.Tensor, **kw) -> tuple:
    out = model(x, **kw)
    assert isinstance(out, tuple)
    return out


def _randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-default BN statistics/affine, so a test sees whether buffers were handled."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def test_registry_lists_every_paper_model_sorted():
    assert MODEL_NAMES == tuple(sorted(MODEL_NAMES))
    assert set(RELEASE_COUNTS) | {"resnet20"} <= set(MODEL_NAMES)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "resnet19", "num_classes": 10}, "unknown arch 'resnet19'; choose one of"),
        ({"name": "resnet20", "num_classes": 10, "method": "kd"}, "unknown method 'kd'"),
        ({"name": "resnet18", "num_classes": 10, "dropout": 0.3}, "has no option 'dropout'"),
        ({"name": "resnet20", "num_classes": 0}, "num_classes must be a positive integer"),
        ({"name": "wrn_16_8", "num_classes": 10, "dropout": 1.5}, "dropout must be in"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(**kwargs)


def test_unknown_arch_message_lists_choices():
    with pytest.raises(ValueError) as err:
        create_model("nope", 10)
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_a_meta_device_build_draws_no_init_values():
    # Meta tensors hold no values: drawing them ran a decomposition that imported torch._dynamo (seconds).
    code = ("import sys, torch\nfrom dhm_fast.models import create_model\n"
            "with torch.device('meta'):\n    create_model('resnet110', 10)\nprint('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "False", result.stderr[-2000:]


@functools.cache
def _meta_model(arch: str, classes: int, method: str = "dhm") -> nn.Module:
    """A model on the meta device (no memory, no values), built once."""
    with torch.device("meta"):
        return create_model(arch, classes, method=method)


@pytest.mark.parametrize("arch", sorted(RELEASE_COUNTS))
def test_parameter_counts_equal_release(arch):
    classes, total, trunk = RELEASE_COUNTS[arch]
    full = _meta_model(arch, classes)  # meta: no allocation, resnet1202 / wrn_28_10 stay cheap
    with torch.device("meta"):
        base = create_model(arch, classes, method="baseline")
    assert param_counts(full) == (total, trunk)
    assert param_counts(base) == (trunk, trunk)
    assert not [n for n, _ in base.named_parameters() if n.startswith("aux")]
    assert (full.num_heads, full.head_names) == (3, ("main", "aux1", "aux2"))
    assert (base.num_heads, base.head_names) == (1, ("main",))


# Forward FLOPs per image of the released architectures: the whole network with its three heads,
# batch 1, eval-mode BN, counted by torch.utils.flop_counter.FlopCounterMode on the authors' model
# code (ImageNet models at 224 px with 1000 classes, CIFAR models at 32 px with 100). A wrong stride,
# kernel or branch placement changes them even when the parameter count stays.
RELEASE_FLOPS = {
    "resnet18": 7_844_397_056,
    "resnet34": 14_318_305_280,
    "resnet50": 16_642_703_360,
    "resnet101": 27_997_732_864,
    "resnet152": 38_042_566_656,
    "resnet32": 383_141_888,
    "resnet110": 1_336_297_472,
    "resnet1202": 15_076_837_376,
    "wrn_16_8": 8_599_617_536,
    "wrn_28_10": 29_466_382_336,
    "densenet_40_12": 1_004_739_264,
    "densenet_100_12": 6_084_566_400,
    "densenet_bc_100_12": 1_362_522_000,
}
# (channels, height, width) of the feature map each head pools for its classifier, at those sizes.
# Every head down-samples as much as the main path (7x7 at 224 px, 8x8 at 32 px). ResNet and WRN:
# aux1 is twice the last stage's width. DenseNet channels: stem 16 (BC: 2 x growth 12), every dense
# layer adds 12 (aux1: 3 x 12), transitions keep (BC: halve) the channels; e.g. DenseNet-40-12,
# 12 layers a stage: main 16 + 3 x 144 = 448, aux2 160 + 144 then 6 x 12 = 376, aux1 304 + 12 x 36 = 736.


def _resnet_heads(side: int, channels: int) -> dict[str, tuple[int, int, int]]:
    """ResNet / WRN heads: aux2 as wide as the main path, aux1 twice as wide, all at the same side."""
    return {"main": (channels, side, side), "aux1": (2 * channels, side, side), "aux2": (channels, side, side)}


HEAD_FEATURES = {
    "resnet18": _resnet_heads(7, 512),
    "resnet34": _resnet_heads(7, 512),
    "resnet50": _resnet_heads(7, 2048),
    "resnet101": _resnet_heads(7, 2048),
    "resnet152": _resnet_heads(7, 2048),
    "resnet32": _resnet_heads(8, 64),
    "resnet110": _resnet_heads(8, 64),
    "resnet1202": _resnet_heads(8, 64),
    "wrn_16_8": _resnet_heads(8, 512),
    "wrn_28_10": _resnet_heads(8, 640),
    "densenet_40_12": {"main": (448, 8, 8), "aux1": (736, 8, 8), "aux2": (376, 8, 8)},
    "densenet_100_12": {"main": (1168, 8, 8), "aux1": (1936, 8, 8), "aux2": (784, 8, 8)},
    "densenet_bc_100_12": {"main": (342, 8, 8), "aux1": (1302, 8, 8), "aux2": (342, 8, 8)},
}


class _PooledFeatures(TorchFunctionMode):
    """Records the shape of every tensor that is globally average-pooled, under the head running it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = "main"
        self.shapes: dict[str, list[tuple[int, ...]]] = {}
        self.hooks: list = []

    def __enter__(self):
        for name in ("aux1", "aux2"):
            branch = getattr(self.model, name)
            self.hooks.append(branch.register_forward_pre_hook(lambda *_, name=name: setattr(self, "head", name)))
            self.hooks.append(branch.register_forward_hook(lambda *_: setattr(self, "head", "main")))
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.mean and tuple(args[1]) == (-2, -1):  # branching.global_pool
            self.shapes.setdefault(self.head, []).append(tuple(args[0].shape[1:]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "resnet1202" else a
                                  for a in sorted(RELEASE_FLOPS)])
def test_forward_flops_and_head_features_equal_release(arch):
    classes = RELEASE_COUNTS[arch][0]
    size = 224 if arch in IMAGENET else 32
    model = _meta_model(arch, classes).eval()  # shapes only: FLOPs and feature maps, nothing computed
    x = torch.empty(1, 3, size, size, device="meta")
    pooled = _PooledFeatures(model)
    with FlopCounterMode(display=False) as flops, pooled, torch.no_grad():
        out = model(x, all_heads=True)
    assert [tuple(o.shape) for o in out] == [(1, classes)] * 3
    assert {head: shapes for head, shapes in pooled.shapes.items()} == {
        head: [shape] for head, shape in HEAD_FEATURES[arch].items()
    }
    assert flops.get_total_flops() == RELEASE_FLOPS[arch]


def test_flops_on_meta_equal_flops_on_the_cpu():
    # The FLOP test above runs on the meta device; the count must not depend on it.
    counts = []
    for device in ("cpu", "meta"):
        with torch.device(device):
            torch.manual_seed(0)
            model = create_model("resnet32", 100).eval()
            x = torch.zeros(1, 3, 32, 32)
        with FlopCounterMode(display=False) as flops, torch.no_grad():
            model(x, all_heads=True)
        counts.append(flops.get_total_flops())
    assert counts == [RELEASE_FLOPS["resnet32"]] * 2


@pytest.mark.parametrize("method", ["dsl", "dks", "dhm"])
def test_every_branch_method_builds_both_branches(method):
    with torch.device("meta"):
        model = create_model("resnet32", 100, method=method)
    assert param_counts(model) == RELEASE_COUNTS["resnet32"][1:]


@pytest.mark.parametrize("arch", IMAGENET)
def test_imagenet_trunk_has_torchvision_names_and_shapes(arch):
    with torch.device("meta"):
        ours = create_model(arch, 1000)
        ref = getattr(torchvision.models, arch)(num_classes=1000)
    trunk = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.startswith("aux")}
    assert trunk == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    # Release layout of the branches: aux2 = layer3-like + layer4-like, aux1 = a 1024-plane layer4.
    names = {
        n.split(".")[0] + "." + n.split(".")[1] for n, _ in ours.named_parameters() if n.startswith("aux")
    }
    assert names == {"aux1.layer4", "aux1.fc", "aux2.layer3", "aux2.layer4", "aux2.fc"}
    expansion = 4 if arch in ("resnet50", "resnet101", "resnet152") else 1
    assert ours.aux1.fc.in_features == 1024 * expansion
    assert ours.aux2.fc.in_features == 512 * expansion


@pytest.mark.parametrize("arch, size", SMALL)
def test_forward_backward_all_heads(arch, size):
    torch.manual_seed(0)
    model = create_model(arch, 7)
    x = torch.randn(2, 3, size, size)
    out = _heads(model, x)
    assert len(out) == 3
    for logits in out:
        assert logits.shape == (2, 7) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    sum(o.square().mean() for o in out).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


@pytest.mark.parametrize("arch, size", FAMILIES)
def test_baseline_returns_one_head_and_eval_a_tensor(arch, size):
    model = _fresh(arch, "baseline")
    x = torch.randn(2, 3, size, size)
    out = _heads(model, x)
    assert len(out) == 1 and out[0].shape == (2, 5)
    model.eval()
    y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 5)
    (main,) = _heads(model, x, all_heads=True)
    torch.testing.assert_close(main, y, rtol=0, atol=0)


@pytest.mark.parametrize("arch, size", FAMILIES)
@pytest.mark.parametrize("active", [(True, False, True), (True, True, False), (True, False, False)])
def test_inactive_branch_is_not_computed(arch, size, active):
    model = _fresh(arch)
    calls = {"aux1": 0, "aux2": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    out = _heads(model, torch.randn(2, 3, size, size), active=active)
    assert len(out) == 3
    for i, name in enumerate(("main", "aux1", "aux2")):
        assert (out[i] is not None) == active[i]
        if i:
            assert calls[name] == int(active[i])
    sum(o.sum() for o in out if o is not None).backward()
    for i, name in ((1, "aux1"), (2, "aux2")):
        grads = [p.grad is not None for p in getattr(model, name).parameters()]
        assert all(grads) if active[i] else not any(grads)


@pytest.mark.parametrize("arch, size", FAMILIES)
def test_branches_fork_from_the_documented_trunk_features(arch, size):
    model = _fresh(arch)
    seen: dict[str, torch.Tensor] = {}
    shallow, deep = FORKS[arch]
    getattr(model, shallow).register_forward_hook(lambda m, i, o: seen.__setitem__("shallow", o))
    getattr(model, deep).register_forward_hook(lambda m, i, o: seen.__setitem__("deep", o))
    model.aux1.register_forward_pre_hook(lambda m, i: seen.__setitem__("aux1", i[0]))
    model.aux2.register_forward_pre_hook(lambda m, i: seen.__setitem__("aux2", i[0]))
    model(torch.randn(2, 3, size, size))
    # aux1 forks at the deeper point, aux2 at the shallower one.
    assert seen["aux1"] is seen["deep"]
    assert seen["aux2"] is seen["shallow"]


def test_trunk_runs_once_per_forward():
    model = create_model("resnet20", 5)
    calls = []
    for name in ("conv1", "layer1", "layer2", "layer3", "fc"):
        getattr(model, name).register_forward_hook(lambda *_, name=name: calls.append(name))
    model(torch.randn(2, 3, 16, 16))
    assert calls == ["conv1", "layer1", "layer2", "layer3", "fc"]


@pytest.mark.parametrize("arch, size", FAMILIES)
def test_eval_returns_main_tensor_and_all_heads_tuple(arch, size):
    model = _fresh(arch)
    _randomize_norms(model)
    calls = []
    model.aux1.register_forward_hook(lambda *_: calls.append("aux1"))
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = model(x)
        assert isinstance(y, torch.Tensor) and y.shape == (2, 5)
        assert calls == []  # evaluation of the main head does not pay for branches
        out = _heads(model, x, all_heads=True)
    assert len(out) == 3 and all(o.shape == (2, 5) for o in out)
    torch.testing.assert_close(out[0], y, rtol=0, atol=0)
    assert not torch.allclose(out[1], y) and not torch.allclose(out[2], y)


@pytest.mark.parametrize(
    "active, message",
    [((True, True), "2 entries but the model has 3 heads"), ((False, True, True), "main head")],
)
def test_bad_active_mask_raises(active, message):
    model = create_model("resnet20", 5)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 8, 8), active=active)


@pytest.mark.parametrize("arch, size", FAMILIES)
def test_channels_last_matches_nchw(arch, size):
    model = _fresh(arch)
    _randomize_norms(model)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = _heads(model, x, all_heads=True)
        model = model.to(memory_format=torch.channels_last)
        out = _heads(model, x.to(memory_format=torch.channels_last), all_heads=True)
    for a, b in zip(ref, out, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet20", "wrn_16_8", "densenet_bc_100_12"])
def test_grayscale_28px_input(arch):
    model = create_model(arch, 10, in_channels=1)
    out = _heads(model, torch.randn(2, 1, 28, 28))
    assert [tuple(o.shape) for o in out] == [(2, 10)] * 3


def test_imagenet_resnet_any_resolution():
    model = create_model("resnet18", 4, in_channels=1)
    for size in (112, 97):
        out = _heads(model, torch.randn(1, 1, size, size))
        assert [tuple(o.shape) for o in out] == [(1, 4)] * 3


@pytest.mark.parametrize("size", [9, 30, 33])
def test_cifar_resnet_odd_resolutions(size):
    # Option-A shortcuts must stay the same size as the strided convolution on odd inputs.
    model = create_model("resnet20", 3)
    out = _heads(model, torch.randn(2, 3, size, size))
    assert [tuple(o.shape) for o in out] == [(2, 3)] * 3


def test_option_a_shortcut_is_pooled_input_plus_zero_channels():
    model = create_model("resnet20", 3)
    shortcut = model.aux1.layer3[0].shortcut  # the deep branch's 32 -> 128 jump
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    y = shortcut(x)
    assert y.shape == (2, 128, 3, 3)
    ref = x.reshape(2, 32, 3, 2, 3, 2).mean(dim=(3, 5))
    torch.testing.assert_close(y[:, :32], ref)
    assert torch.count_nonzero(y[:, 32:]) == 0
    assert sum(p.numel() for p in shortcut.parameters()) == 0


# Weighted layers (convolutions and linear) on the longest path through each FAMILIES model.
DEPTH = {"resnet18": 18, "resnet20": 20, "wrn_16_8": 16, "densenet_40_12": 40}
BF16_UNIT_ROUNDOFF = 2.0**-8  # bfloat16 keeps 8 significant bits


@pytest.mark.parametrize("arch, size", FAMILIES)
def test_autocast_bf16_cpu_matches_fp32_within_bf16_precision(arch, size):
    model = _fresh(arch).to(memory_format=torch.channels_last)
    _randomize_norms(model)
    x = torch.randn(2, 3, size, size).to(memory_format=torch.channels_last)
    # Eval mode: training-mode BN over a batch of 2 at 1x1 resolution (resnet18's last stage here)
    # amplifies any rounding without bound, which says nothing about autocast.
    model.eval()
    with torch.no_grad():
        fp32 = _heads(model, x, all_heads=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = _heads(model, x, all_heads=True)
    # Each weighted layer rounds its inputs and weights to bf16 (relative error <= u each) and
    # accumulates in fp32; to first order the relative errors of the layers add up along the path,
    # so the logits may be off by depth x u in norm, and no more.
    bound = DEPTH[arch] * BF16_UNIT_ROUNDOFF
    for head, a, b in zip(("main", "aux1", "aux2"), fp32, bf16, strict=True):
        assert b.dtype == torch.bfloat16
        error = ((b.float() - a).norm() / a.norm()).item()
        assert error < bound, (head, error, bound)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _heads(model, x)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in out)
    sum(o.float().sum() for o in out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_compiles_as_one_graph_per_active_mask():
    # fullgraph=True fails on any graph break, e.g. a host sync such as .item() or a data-dependent if.
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = create_model("resnet20", 5, in_channels=1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 1, 12, 12)
    for active in [(True, True, True), (True, False, True)]:
        out = compiled(x, active=active)
        ref = model(x, active=active)
        for a, b in zip(out, ref, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        sum(o.sum() for o in out if o is not None).backward()
    model.eval()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert param_counts(compiled) == param_counts(model)


def test_wrn_dropout_option():
    torch.manual_seed(0)
    model = create_model("wrn_16_8", 5, dropout=0.3)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.3 for m in drops)
    assert any(n.startswith("aux1.") for n, m in model.named_modules() if isinstance(m, nn.Dropout))
    assert param_counts(model) == param_counts(_cached("wrn_16_8", "dhm"))
    x = torch.randn(2, 3, 8, 8)
    assert not torch.equal(model(x)[0], model(x)[0])  # dropout active in training
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    assert not [m for m in _cached("wrn_16_8", "dhm").modules() if isinstance(m, nn.Dropout)]


@pytest.mark.parametrize("arch", ["resnet18", "resnet20", "wrn_16_8", "densenet_bc_100_12"])
def test_init_is_he_fan_out_and_unit_batchnorm(arch):
    model = _cached(arch, "dhm")  # read only
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 20_000]
    assert convs
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        std = conv.weight.std().item()
        assert abs(std / math.sqrt(2.0 / fan_out) - 1) < 0.1, (conv, std)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_channels_last_fp16_matches_cpu():
    model = _fresh("resnet20")
    _randomize_norms(model)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = _heads(model, x, all_heads=True)
    gpu = model.cuda().to(memory_format=torch.channels_last)
    xg = x.cuda().to(memory_format=torch.channels_last)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would differ from CPU by ~1e-3
    try:
        with torch.no_grad():
            out = _heads(gpu, xg, all_heads=True)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        half = _heads(gpu, xg, all_heads=True)
    for a, b, h in zip(ref, out, half, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-3)
        assert h.dtype == torch.float16
        torch.testing.assert_close(h.float().cpu(), a, rtol=5e-2, atol=5e-2)
    gpu.train()
    logits = gpu(xg, active=(True, False, True))
    assert logits[1] is None
    sum(o.float().sum() for o in logits if o is not None).backward()
