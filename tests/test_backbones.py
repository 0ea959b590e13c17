"""DHM branches on torchvision and timm networks (tv:NAME / timm:NAME): fork points, the generic branch, and
everything the paper's networks support (branch sampling, channels-last, autocast, compile, DDP, resume)."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from small_data import write_fashion_mnist
from torch import nn

from dhm_fast import checkpoint
from dhm_fast.cli import main
from dhm_fast.losses import LossConfig
from dhm_fast.models import backbones, create_model

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")

# arch -> default (shallow, deep) fork points: the outputs of the two stages before the last one
FAMILIES = {
    "tv:resnet18": ("layer2", "layer3"),
    "tv:convnext_tiny": ("features.3", "features.5"),
    "tv:mobilenet_v3_small": ("features.3", "features.8"),
    "tv:efficientnet_b0": ("features.3", "features.5"),
    "timm:resnet18": ("layer2", "layer3"),
}
ARCHS = [pytest.param(a, marks=needs_timm) if a.startswith("timm:") else a for a in FAMILIES]


@functools.cache
def _built(arch: str, method: str = "dhm", in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return create_model(arch, 5, method=method, in_channels=in_channels)


def _fresh(arch: str) -> nn.Module:
    """A private copy with non-default norm statistics, so a missed buffer changes the outputs."""
    model = create_model(_built(arch).arch, 5)
    model.load_state_dict(_built(arch).state_dict())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_branches_fork_at_the_stage_outputs_before_the_last_stage(arch):
    model = _fresh(arch)
    assert model.forks == FAMILIES[arch] and model.head_names == ("main", "aux1", "aux2")
    assert not [n for n, _ in model.named_parameters() if not n.startswith(("trunk.", "aux1.", "aux2."))]
    stock = backbones.stock_constructor(arch)(5).eval()  # the untraced network, the same weights
    stock.load_state_dict({k.removeprefix("trunk."): v for k, v in model.state_dict().items() if k[:3] != "aux"})
    seen = {}
    for key, name in zip(("shallow", "deep"), FAMILIES[arch], strict=True):
        stock.get_submodule(name).register_forward_hook(lambda m, i, o, key=key: seen.__setitem__(key, o))
    model.aux1.register_forward_pre_hook(lambda m, i: seen.__setitem__("aux1", i[0]))
    model.aux2.register_forward_pre_hook(lambda m, i: seen.__setitem__("aux2", i[0]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.eval()(x, all_heads=True)
        stock(x)
    assert [tuple(o.shape) for o in out] == [(2, 5)] * 3
    assert torch.equal(seen["aux1"], seen["deep"]) and torch.equal(seen["aux2"], seen["shallow"])


@pytest.mark.parametrize("arch", ARCHS)
def test_baseline_is_the_stock_network_exactly(arch):
    stock = backbones.stock_constructor(arch)(5)
    model = create_model(arch, 5, method="baseline")
    assert model.num_heads == 1
    own = {k.removeprefix("trunk."): v for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in stock.state_dict().items()}
    stock.load_state_dict(own)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), rtol=0, atol=0)


@pytest.mark.parametrize("active", [(True, False, True), (True, True, False), (True, False, False)])
def test_a_skipped_branch_is_not_computed(active):
    model = _fresh("tv:mobilenet_v3_small")
    calls = {"aux1": 0, "aux2": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    out = model(torch.randn(2, 3, 32, 32), active=active)
    sum(o.sum() for o in out if o is not None).backward()
    for i, name in ((1, "aux1"), (2, "aux2")):
        assert (out[i] is not None) == active[i] and calls[name] == int(active[i])
        grads = [p.grad is not None for p in getattr(model, name).parameters()]
        assert all(grads) if active[i] else not any(grads)


def test_generic_branch_depth_width_and_cost_are_reported():
    model = _built("tv:resnet18")
    # aux2 forks at 1/8 of the input (two halvings to the last stage), aux1 at 1/16 (one)
    assert model.aux2.stage_names == ("conv1", "conv2") and model.aux1.stage_names == ("conv1",)
    assert model.aux2.conv1[0].out_channels == 128 and model.aux1.conv1[0].out_channels == 256
    lines = backbones.branch_summary(model, 224)
    assert lines[0] == "trunk tv:resnet18: 3627.1 MFLOPs per image at 224 px"  # 1.81 GMACs: torchvision's count
    # 3x3x128x128 MACs at 14x14, then at 7x7, and the 128 x 5 classifier; 2 FLOPs per MAC
    aux2 = 2 * (9 * 128 * 128 * (14 * 14 + 7 * 7) + 128 * 5) / 1e6
    assert lines[1] == f"aux2 at layer2: 2 conv(s) 3x3 stride 2, width 128, {aux2:.1f} MFLOPs per image"
    assert lines[2].startswith("aux1 at layer3: 1 conv(s) 3x3 stride 2, width 256")
    assert backbones.branch_summary(_built("resnet18"), 224) == []  # the paper's branches are the paper's


def test_fork_at_takes_any_feature_map_node_in_either_order():
    model = create_model("tv:resnet18", 5, fork_at=["layer3.0", "layer1"])
    assert model.forks == ("layer1", "layer3.0")  # aux2 forks at the shallower point
    assert model.aux2.conv1[0].in_channels == 64 and len(model.aux2.stage_names) == 3
    assert model.aux1.conv1[0].in_channels == 256
    last = create_model("tv:resnet18", 5, fork_at=["layer4.0", "layer4.1.conv1"])
    assert last.aux1.conv1[0].stride == (1, 1)  # already at the last resolution: one conv of stride 1
    assert [tuple(o.shape) for o in last(torch.randn(2, 3, 32, 32))] == [(2, 5)] * 3


@pytest.mark.parametrize("fork_at, message", [
    (["layer2", "nope"], "unknown fork point 'nope' for tv:resnet18; python train.py --list-fork-points"),
    (["layer2", "fc"], r"fork point 'fc' of tv:resnet18 outputs shape \[1, 10\]"),
    (["layer2", "layer2.1"], "are the same node"),
    (["layer2"], "takes two fork points"),
])
def test_bad_fork_points_are_one_line(fork_at, message):
    with pytest.raises(ValueError, match=message):
        create_model("tv:resnet18", 5, fork_at=fork_at)


def test_unknown_names_and_a_missing_timm_are_one_line(monkeypatch):
    with pytest.raises(ValueError, match="unknown torchvision classifier 'nope'"):
        create_model("tv:nope", 5)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ValueError, match="timm: architectures need the timm package: pip install timm"):
        create_model("timm:resnet18", 5)


def test_gray_images_are_repeated_for_torchvision_networks():
    model = create_model("tv:resnet18", 5, method="baseline", in_channels=1).eval()
    stock = backbones.stock_constructor("tv:resnet18")(5).eval()
    stock.load_state_dict({k.removeprefix("trunk."): v for k, v in model.state_dict().items()})
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x.expand(-1, 3, -1, -1)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="takes 3-channel images"):
        create_model("tv:resnet18", 5, in_channels=2)


@pytest.mark.parametrize("arch", ["tv:resnet18", "tv:convnext_tiny"])
def test_channels_last_and_bf16_autocast(arch):
    model = _fresh(arch).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, all_heads=True)
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
        for a, b in zip(ref, model(x, all_heads=True), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, all_heads=True)
    for a, b in zip(ref, low, strict=True):  # a loose bound: only the precision changed, not the network
        assert b.dtype == torch.bfloat16 and ((b.float() - a).norm() / a.norm()).item() < 0.1
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    sum(o.float().sum() for o in out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_compiles_as_one_graph_per_active_mask():
    torch._dynamo.reset()
    model = _fresh("tv:resnet18")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    for active in [(True, True, True), (True, False, True)]:
        for a, b in zip(compiled(x, active=active), model(x, active=active), strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_ddp_trains_with_a_sampled_branch_and_the_fused_loss(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _fresh("tv:mobilenet_v3_small")
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        loss = LossConfig(method="dhm")
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
        for active in [(True, False, True), (True, True, True)]:
            value = loss.compute(net(x, active=active), y, active=active)[0]
            value.backward()
            assert torch.isfinite(value)
        assert all(p.grad is not None for p in model.aux1.parameters())
    finally:
        dist.destroy_process_group()


def test_benchmark_flop_ratio_counts_the_branches():
    from benchmarks.flops import model_step_flops

    dhm = model_step_flops("tv:resnet18", "dhm", 64)
    base = model_step_flops("tv:resnet18", "baseline", 64)
    half = model_step_flops("tv:resnet18", "dhm", 64, branch_prob=0.5)
    assert base < half < dhm < 1.2 * base  # the generic branches are cheap next to the trunk


def test_the_command_line_lists_fork_points_and_refuses_bad_names(capsys):
    assert main(["--list-fork-points", "tv:resnet18"]) == 0
    out = capsys.readouterr().out
    assert "layer2                           [1, 128, 28, 28]         stage aux2 (default)" in out
    assert "layer3.0                         [1, 256, 14, 14]" in out
    assert "aux2 at layer2: 2 conv(s) 3x3 stride 2, width 128" in out  # the default branches' cost
    for args, message in ((["--arch", "tv:nope"], "unknown torchvision classifier"),
                          (["--arch", "tv:resnet18", "--fork-at", "layer2,nope"], "unknown fork point 'nope'"),
                          (["--arch", "resnet20", "--fork-at", "layer2,layer3"], "--fork-at is for tv:NAME"),
                          (["--list-fork-points", "nope"], "unknown arch 'nope'")):
        assert main(args + ["--data-dir", "/nonexistent"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


@pytest.mark.slow
def test_a_backbone_run_resumes_exactly(tmp_path, capsys):
    # mobilenet_v3_small has dropout: an exact resume needs the RNG states back
    data = write_fashion_mnist(tmp_path / "fm", n_train=32, n_test=8, side=16)
    common = ["--arch", "tv:mobilenet_v3_small", "--batch-size", "8", "--epochs", "2", "--lr", "0.05",
              "--branch-prob", "0.6", "--amp", "none", "--no-channels-last", "--deterministic",
              "--num-workers", "0", "--data-dir", str(data)]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(common + ["--out", str(whole)]) == 0
    assert main(common + ["--out", str(parts), "--max-steps", "3"]) == 0
    assert main(common + ["--out", str(parts)]) == 0
    assert "resumed from" in capsys.readouterr().out
    a, b = checkpoint.load(whole / "last.pt")["model"], checkpoint.load(parts / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # features.2 has the default aux2 fork's shape: the weights would load, into another network
    assert main(common + ["--out", str(parts), "--epochs", "3", "--fork-at", "features.2,features.8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained with --fork-at None, not features.2,features.8" in err and "\n" not in err, err


@pytest.mark.slow
def test_two_torchrun_processes_train_a_backbone_with_sampled_branches(tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", n_train=32, n_test=8, side=16)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--arch", "tv:mobilenet_v3_small", "--batch-size", "8", "--epochs", "1", "--branch-prob", "0.5",
           "--amp", "none", "--no-channels-last", "--data-dir", str(data), "--out", str(tmp_path / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint.load(tmp_path / "run" / "last.pt")["world_size"] == 2
