"""Export: the inference network without branches, torchvision state dicts, and release checkpoints.

* :func:`strip_branches` - the same architecture built with ``method="baseline"``, trunk copied.
* :func:`to_torchvision` - an ImageNet ResNet's trunk as a state dict for ``torchvision.models``.
* :func:`from_release` - a checkpoint in the authors' naming (``layer3_head2``, ``fc_head1`` ...,
  optionally ``module.``-prefixed) renamed to ours (``aux2.layer3``, ``aux1.fc`` ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .models import IMAGENET_ARCHS, MODEL_NAMES, BranchedNet, create_model, unwrap
from .models.branching import is_branch_key

__all__ = ["from_release", "strip_branches", "to_torchvision"]

# First name component of every trunk tensor in the release (and ours): ResNet, WRN, DenseNet.
_TRUNK_ROOTS = frozenset(
    {"conv", "conv1", "bn", "bn1", "layer1", "layer2", "layer3", "layer4", "transition1", "transition2", "fc"}
)
# Stages a release branch may hold: ``<stage>_head<k>`` becomes ``aux<k>.<stage>``.
_BRANCH_STAGES = frozenset({"layer2", "layer3", "layer4", "transition2", "bn", "fc"})
_RELEASE_BRANCH = re.compile(r"^([a-z0-9]+)_head([12])$")


def _bare(model: nn.Module) -> BranchedNet:
    inner = unwrap(model)
    if not isinstance(inner, BranchedNet) or not inner.arch:
        raise ValueError(f"expected a model made by dhm_fast.models.create_model, got {type(inner).__name__}")
    return inner


def strip_branches(model: nn.Module) -> BranchedNet:
    """The inference network: same arch, ``method="baseline"``, trunk weights and buffers copied.

    The copy lives on the source model's device and dtype and keeps its train/eval mode.
    """
    src = _bare(model)
    config = dict(src.build_config)
    with torch.device("meta"):  # skip the random init: every tensor is overwritten below
        out = create_model(src.arch, method="baseline", **config)  # type: ignore[arg-type]
    ref = next(iter(src.parameters()))
    out = out.to_empty(device=ref.device).to(ref.dtype)
    trunk = {k: v for k, v in src.state_dict().items() if not is_branch_key(k)}
    out.load_state_dict(trunk, strict=True)
    return out.train(src.training)


def to_torchvision(model: nn.Module) -> dict[str, Tensor]:
    """State dict of an ImageNet ResNet's trunk for ``torchvision.models.resnetXX(num_classes=...)``.

    The tensors share storage with the model (like ``state_dict()``); load with ``strict=True``.
    """
    src = unwrap(model)
    arch = getattr(src, "arch", "")
    if not isinstance(src, BranchedNet) or arch not in IMAGENET_ARCHS:
        name = arch or type(src).__name__
        raise ValueError(
            f"to_torchvision needs an ImageNet ResNet ({', '.join(IMAGENET_ARCHS)}); got '{name}'"
        )
    if src.conv1.in_channels != 3:
        raise ValueError(f"torchvision ResNets take 3 input channels; this model has {src.conv1.in_channels}")
    return {k: v for k, v in src.state_dict().items() if not is_branch_key(k)}


def _rename(original: str) -> str:
    key = original.removeprefix("module.")
    root, _, rest = key.partition(".")
    if root in _TRUNK_ROOTS:
        return key
    match = _RELEASE_BRANCH.match(root)
    if match and match.group(1) in _BRANCH_STAGES:
        stage, head = match.groups()
        return f"aux{head}.{stage}" + (f".{rest}" if rest else "")
    raise ValueError(f"unexpected key '{original}' in the release state dict")


def _num_classes_and_channels(state: Mapping[str, Tensor], arch: str) -> tuple[int, int]:
    if "fc.weight" not in state:
        raise ValueError(f"the release state dict has no 'fc.weight'; cannot check it against '{arch}'")
    first_conv = state.get("conv1.weight", state.get("conv.weight"))
    if first_conv is None:
        raise ValueError(f"the release state dict has no first convolution; cannot check it against '{arch}'")
    return int(state["fc.weight"].shape[0]), int(first_conv.shape[1])


def from_release(state_dict: Mapping[str, Tensor], arch: str | None = None) -> dict[str, Tensor]:
    """Rename a checkpoint of the authors' release (``layer4_head1.0.conv1.weight`` ...) to ours.

    A ``module.`` prefix (DataParallel) is dropped. Without ``arch`` the keys are only renamed (an
    unknown one raises ValueError). With ``arch`` the result is also checked against our model of
    that architecture (class count and input channels read from the weights): every key and shape
    must match, and BatchNorm ``num_batches_tracked`` counters missing from old checkpoints are
    filled with 0, so the result loads with ``strict=True``.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]  # a whole training checkpoint of the release
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        out[_rename(key)] = value
    if arch is None:
        return out
    if arch not in MODEL_NAMES:
        raise ValueError(f"unknown arch '{arch}'; choose one of {', '.join(MODEL_NAMES)}")

    num_classes, in_channels = _num_classes_and_channels(out, arch)
    method = "dhm" if any(is_branch_key(k) for k in out) else "baseline"
    with torch.device("meta"):
        expected = create_model(arch, num_classes, method=method, in_channels=in_channels).state_dict()
    for key, value in out.items():
        if key not in expected:
            raise ValueError(f"unexpected key '{key}' for arch '{arch}' (after renaming)")
        want = tuple(expected[key].shape)
        if tuple(value.shape) != want:
            raise ValueError(f"shape of '{key}' is {tuple(value.shape)}, arch '{arch}' expects {want}")
    for key, ref in expected.items():
        if key in out:
            continue
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=ref.dtype)
        else:
            raise ValueError(f"the release state dict lacks '{key}' needed by arch '{arch}'")
    return out
