"""--deterministic on CUDA, proven on the CPU: the cuBLAS workspace is configured before CUDA starts (a
value that does not suit is one line), and no op of a training step of any architecture family is one that
PyTorch lists as having no deterministic CUDA implementation (such an op raises at the first step)."""

from __future__ import annotations

import contextlib
import os
import re

import pytest
import torch
import torch.nn.functional as F
from test_gpu_path import FakeCuda, run_until_loaders
from torch.utils._python_dispatch import TorchDispatchMode

from dhm_fast.config import build_config
from dhm_fast.determinism import CUBLAS_VAR, prepare
from dhm_fast.engine import step_parts, train_step
from dhm_fast.errors import UserError
from dhm_fast.models import create_model
from dhm_fast.models.backbones import adaptive_avg_pool2d
from dhm_fast.optim import build_optimizer
from dhm_fast.sampling import BranchSampler

# Source: the docstring of torch.use_deterministic_algorithms in torch 2.14.1 (also at
# https://docs.pytorch.org/docs/stable/generated/torch.use_deterministic_algorithms.html), the list after
# "The following normally-nondeterministic operations will throw a RuntimeError when mode=True", verbatim
# less the reST markup; each entry with the aten ops that carry it (what a dispatch trace shows).
LISTED_IN = "2.14.1"
NO_DETERMINISTIC_CUDA = {
    "torch.nn.AvgPool3d when attempting to differentiate a CUDA tensor": ("avg_pool3d_backward",),
    "torch.nn.AdaptiveAvgPool2d when attempting to differentiate a CUDA tensor": ("_adaptive_avg_pool2d_backward",),
    "torch.nn.AdaptiveAvgPool3d when attempting to differentiate a CUDA tensor": ("_adaptive_avg_pool3d_backward",),
    "torch.nn.AdaptiveMaxPool2d when attempting to differentiate a CUDA tensor": ("adaptive_max_pool2d_backward",),
    "torch.nn.FractionalMaxPool2d when attempting to differentiate a CUDA tensor":
        ("fractional_max_pool2d_backward",),
    "torch.nn.FractionalMaxPool3d when attempting to differentiate a CUDA tensor":
        ("fractional_max_pool3d_backward",),
    "torch.nn.MaxUnpool1d": ("max_unpool2d",),  # F.max_unpool1d runs max_unpool2d
    "torch.nn.MaxUnpool2d": ("max_unpool2d",),
    "torch.nn.MaxUnpool3d": ("max_unpool3d",),
    "torch.nn.functional.interpolate when attempting to differentiate a CUDA tensor and one of the following "
    "modes is used: - linear - bilinear - bicubic - trilinear":
        ("upsample_linear1d_backward", "upsample_bilinear2d_backward", "_upsample_bilinear2d_aa_backward",
         "upsample_bicubic2d_backward", "_upsample_bicubic2d_aa_backward", "upsample_trilinear3d_backward"),
    "torch.nn.ReflectionPad1d when attempting to differentiate a CUDA tensor": ("reflection_pad1d_backward",),
    "torch.nn.ReflectionPad2d when attempting to differentiate a CUDA tensor": ("reflection_pad2d_backward",),
    "torch.nn.ReflectionPad3d when attempting to differentiate a CUDA tensor": ("reflection_pad3d_backward",),
    # The check sits in the spatial variant's reduction (NLLLoss2d.cu); cross_entropy on [B, K] logits runs
    # the 1-D nll_loss, whose CUDA kernels have none.
    "torch.nn.NLLLoss when called on a CUDA tensor": ("nll_loss2d_forward",),
    "torch.nn.CTCLoss when attempting to differentiate a CUDA tensor": ("_ctc_loss_backward",),
    "torch.nn.EmbeddingBag when attempting to differentiate a CUDA tensor when mode='max'":
        ("_embedding_bag_backward", "_embedding_bag_dense_backward"),
    "torch.Tensor.put_ when accumulate=False": ("put_", "put"),
    "torch.Tensor.put_ when accumulate=True and called on a CUDA tensor": ("put_", "put"),
    "torch.histc when called on a CUDA tensor": ("histc",),
    "torch.bincount when called on a CUDA tensor and weights tensor is given": ("bincount",),
    "torch.median with indices output when called on a CUDA tensor": ("median",),
    "torch.nn.functional.grid_sample when attempting to differentiate a CUDA tensor":
        ("grid_sampler_2d_backward", "grid_sampler_3d_backward", "cudnn_grid_sampler_backward"),
    "torch.Tensor.scatter_reduce when reduce='prod' and called on CUDA tensor": ("scatter_reduce",),
    "torch.Tensor.resize_ when called with a quantized tensor": (),  # no quantized tensors here
}
FORBIDDEN = {op for ops in NO_DETERMINISTIC_CUDA.values() for op in ops}


@pytest.fixture(autouse=True)
def _restore_determinism():
    mode, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(mode)
    torch.backends.cudnn.benchmark = benchmark


# --- the cuBLAS workspace -------------------------------------------------------------------------------

@pytest.fixture
def no_cublas_config(monkeypatch):
    monkeypatch.setenv(CUBLAS_VAR, "")  # recorded, so whatever the test sets is undone
    monkeypatch.delenv(CUBLAS_VAR)


def test_the_workspace_is_set_when_unset_and_a_deterministic_one_is_kept(no_cublas_config, monkeypatch):
    prepare(False)
    assert CUBLAS_VAR not in os.environ
    prepare(True)
    assert os.environ[CUBLAS_VAR] == ":4096:8"
    monkeypatch.setenv(CUBLAS_VAR, ":16:8")
    prepare(True)
    assert os.environ[CUBLAS_VAR] == ":16:8"


@pytest.mark.parametrize("value", ["", ":0:0", "4096:8", ":4096:2"])
def test_a_workspace_that_is_not_deterministic_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv(CUBLAS_VAR, value)
    prepare(False)  # not asked for determinism: none of our business
    with pytest.raises(UserError) as err:
        prepare(True)
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8 or :16:8" in str(err.value) and repr(value) in str(err.value)
    assert "\n" not in str(err.value) and os.environ[CUBLAS_VAR] == value


def test_a_run_sets_the_workspace_before_it_sets_its_gpu(no_cublas_config, monkeypatch):
    fake = FakeCuda(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda d: fake.events.append(f"set_device with {os.environ.get(CUBLAS_VAR)}"))
    run_until_loaders(monkeypatch, fake, {"device": "cuda", "deterministic": True})
    assert fake.events[0] == "set_device with :4096:8", fake.events


def test_the_cli_refuses_a_workspace_that_is_not_deterministic(monkeypatch, capsys, tmp_path):
    from dhm_fast.cli import main

    monkeypatch.setenv(CUBLAS_VAR, ":0:0")
    args = ["--deterministic", "--loader", "synthetic", "--epochs", "1", "--max-steps", "1", "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2  # (bounded: were it not refused, one step)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and CUBLAS_VAR in err, err
    assert not (tmp_path / "run" / "last.pt").exists()


# --- no op without a deterministic CUDA implementation in a training step -------------------------------

def documented_entries(doc: str) -> list[str]:
    """The bullets of the docstring's "will throw a RuntimeError" list, markup removed, whitespace collapsed."""
    section = doc.split("operations will throw a", 1)[1].split("In addition", 1)[0]
    text = re.sub(r":(class|func):|`", "", section.split("``mode=True``:", 1)[1])
    return [" ".join(item.split()) for item in text.split("\n        * ") if item.strip()]


@pytest.mark.skipif(not torch.__version__.startswith(LISTED_IN), reason=f"the list is torch {LISTED_IN}'s")
def test_the_kept_list_is_the_installed_torch_s():
    # A torch upgrade that changes the list fails here: review NO_DETERMINISTIC_CUDA, then update LISTED_IN.
    assert documented_entries(torch.use_deterministic_algorithms.__doc__) == list(NO_DETERMINISTIC_CUDA)


class OpNames(TorchDispatchMode):
    """The name of every aten op dispatched, forward and backward (the CPU backward runs on this thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def training_step_ops(arch: str, recipe: str | None, side: tuple[int, int]) -> set[str]:
    """One real optimizer step (every head on, the recipe's loss and optimizer) under deterministic algorithms."""
    cfg = build_config(recipe, {"arch": arch, "method": "dhm", "amp": "none", "channels_last": False})
    torch.manual_seed(0)
    model = create_model(arch, 5, method="dhm")
    sampler = BranchSampler(model.num_heads, 1.0, "step", 0)
    parts = step_parts(cfg, model, build_optimizer(model, cfg, torch.device("cpu")), None,
                       contextlib.nullcontext, sampler)
    batch = (torch.randn(2, 3, *side), torch.tensor([0, 3]))
    torch.use_deterministic_algorithms(True)
    with OpNames() as ops:
        train_step(parts, [batch], (True,) * model.num_heads, alpha=1.0, temperature=2.0)
    return ops.names


@pytest.mark.parametrize("arch, recipe, side", [
    ("resnet20", None, (32, 32)),
    ("wrn_16_8", "cifar100-wrn-16-8", (32, 32)),
    ("densenet_40_12", "cifar100-densenet-40-12", (32, 32)),
    ("resnet18", "imagenet-resnet18", (64, 64)),
    ("reid_mobilenetv2", "market1501-mobilenetv2", (64, 32)),
    pytest.param("reid_resnet50", "market1501-resnet50", (64, 32), marks=pytest.mark.slow),
    ("tv:mobilenet_v3_small", None, (64, 64)),  # squeeze-excitation pools inside the trunk
    ("tv:alexnet", None, (64, 64)),  # the stock classifier pools to 6x6
])
def test_a_training_step_uses_no_op_without_a_deterministic_cuda_implementation(arch, recipe, side):
    ops = training_step_ops(arch, recipe, side)
    assert "convolution_backward" in ops  # the backward was traced
    assert not ops & FORBIDDEN, sorted(ops & FORBIDDEN)


def test_the_trace_sees_a_listed_op_and_the_deterministic_pool_avoids_it():
    torch.use_deterministic_algorithms(True)
    x = torch.randn(2, 3, 13, 13, requires_grad=True)
    for pool, flagged in ((F.adaptive_avg_pool2d, True), (adaptive_avg_pool2d, False)):
        with OpNames() as ops:
            grad, = torch.autograd.grad(pool(x, (6, 6)).square().sum(), x)
        assert bool(ops.names & FORBIDDEN) == flagged, ops.names
        torch.testing.assert_close(grad, torch.autograd.grad(F.adaptive_avg_pool2d(x, (6, 6)).square().sum(), x)[0])


@pytest.mark.parametrize("shape, size", [((1, 1), (7, 7)), ((7, 7), 7), ((13, 13), (6, 6)), ((10, 9), (7, 3)),
                                         ((5, 5), (None, 2))])
def test_the_deterministic_pool_equals_adaptive_average_pooling(shape, size):
    x = torch.randn(2, 3, *shape, requires_grad=True)
    torch.use_deterministic_algorithms(True)  # the products are used only then
    torch.testing.assert_close(adaptive_avg_pool2d(x, size), F.adaptive_avg_pool2d(x, size))
