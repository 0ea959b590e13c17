"""Export: the inference network without branches, stock state dicts, and release checkpoints.

* :func:`strip_branches` - the same architecture built with ``method="baseline"``, trunk copied.
* :func:`to_torchvision` - an ImageNet ResNet's trunk as a state dict for ``torchvision.models``.
* :func:`to_stock` - that, or a ``tv:``/``timm:`` trunk's state dict for :func:`stock_network`.
* :func:`export_run` - ``python -m dhm_fast.export RUN/best.pt --out DIR``: the stripped network as
  ``model.safetensors`` and ``model.pt`` (stock names), checked against the stock constructor, and a
  model card ``model.json``.
* :func:`from_release` - a checkpoint in the authors' naming (``layer3_head2``, ``fc_head1`` ...,
  optionally ``module.``-prefixed) renamed to ours (``aux2.layer3``, ``aux1.fc`` ...).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint
from .errors import UserError, WriteError
from .models import IMAGENET_ARCHS, MODEL_NAMES, BranchedNet, backbones, create_model, unwrap
from .models.branching import is_branch_key

__all__ = ["export_run", "from_release", "stock_network", "strip_branches", "to_stock", "to_torchvision"]

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


def stock_network(arch: str, num_classes: int, in_channels: int = 3) -> tuple[nn.Module, str]:
    """The stock network (randomly initialised) that ``to_stock`` state dicts load into, and the call making it."""
    source, _, name = arch.partition(":")
    if arch in IMAGENET_ARCHS:
        import torchvision

        call = f"torchvision.models.{arch}(num_classes={num_classes})"
        return getattr(torchvision.models, arch)(num_classes=num_classes), call
    if not backbones.is_backbone(arch):
        raise ValueError(f"{arch} has no stock torchvision or timm constructor; exportable: "
                         f"{', '.join(IMAGENET_ARCHS)}, tv:NAME and timm:NAME")
    call = (f"torchvision.models.get_model('{name}', num_classes={num_classes})" if source == "tv" else
            f"timm.create_model('{name}', num_classes={num_classes}, in_chans={in_channels})")
    return backbones.stock_constructor(arch)(num_classes, in_channels), call


def to_stock(model: nn.Module) -> dict[str, Tensor]:
    """The trunk's state dict in the stock network's names (it shares storage with the model)."""
    src = _bare(model)
    if not backbones.is_backbone(src.arch):
        return to_torchvision(src)
    prefix = backbones.STOCK_PREFIX
    return {k.removeprefix(prefix): v for k, v in src.state_dict().items() if k.startswith(prefix)}


def _final_accuracy(run: Path) -> dict | None:
    """Per-head validation accuracy of the run's last epoch (log.jsonl next to the checkpoint), or None."""
    from .logbook import read_log

    try:
        epochs = read_log(run, kind="epoch")
    except (OSError, ValueError):
        return None
    return epochs[-1]["val"]["heads"] if epochs else None


def export_run(path: str | Path, out: str | Path) -> dict:
    """Strip a dhm_fast checkpoint's branches, write its stock weights and model card; return the card.

    The written files are read back into the stock constructor, which must reproduce the trained trunk's
    outputs on a random batch; a UserError (one line) otherwise, or for a file that is not a checkpoint.
    """
    from safetensors.torch import load_file, save

    from .config import NATIVE_SIDES
    from .provenance import provenance

    path, out = Path(path), Path(out)
    ckpt = checkpoint.load(path)
    if not {"model", "config", "num_classes"} <= ckpt.keys():
        raise UserError(f"{path} is not a dhm_fast checkpoint (no model, config and class count)")
    weights = checkpoint.model_state(ckpt)
    cfg, num_classes = ckpt["config"], int(ckpt["num_classes"])
    arch, method = cfg["arch"], cfg["method"]
    channels = next(int(v.shape[1]) for v in weights.values() if v.dim() == 4)  # of the first convolution
    options = {"fork_at": cfg["fork_at"].split(",")} if cfg.get("fork_at") and backbones.is_backbone(arch) else {}
    model = create_model(arch, num_classes, method=method, in_channels=channels, **options)
    checkpoint.load_model_weights(model, weights, str(path), f"{arch} ({method})")
    trunk = strip_branches(model).eval()
    try:
        stock, call = stock_network(arch, num_classes, channels)
        state = {k: v.detach().contiguous() for k, v in to_stock(trunk).items()}
    except ValueError as e:
        raise UserError(f"cannot export {path}: {e}") from None
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    with _writing(path):
        checkpoint.write_atomic(out / "model.safetensors", lambda f: f.write(save(state)))
        checkpoint.save_atomic(state, out / "model.pt")

    side = NATIVE_SIDES.get(cfg.get("dataset"), int(cfg.get("image_size", 224)))
    x = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trunk(x)
        for name, loaded in (("model.safetensors", load_file(out / "model.safetensors")),
                             ("model.pt", torch.load(out / "model.pt", weights_only=True))):
            try:
                stock.load_state_dict(loaded, strict=True)
            except RuntimeError as e:
                raise UserError(f"{out / name} does not load into {call}: {str(e).splitlines()[0]}") from None
            got = stock.eval()(x)
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                raise UserError(f"{out / name} in {call} gives other outputs than the trained network "
                                f"(max difference {(got - want).abs().max().item():.3g})")

    made = ckpt.get("provenance") or {**provenance(), "command": None}  # an older checkpoint: the exporter's
    progress = ckpt.get("progress") or {}
    card = {
        "architecture": arch,
        "stock_constructor": call,
        "num_classes": num_classes,
        "input_channels": channels,
        "dataset": cfg.get("dataset"),
        "recipe": cfg.get("recipe"),
        "method": method,
        "fork_points": list(getattr(model, "forks", ())) or None,
        "epochs": cfg.get("epochs"),
        "exported_checkpoint": {"file": str(path), "epochs_trained": ckpt["epoch"] + 1 if "epoch" in ckpt
                                else progress.get("epoch")},
        "final_val_accuracy": _final_accuracy(path.parent),
        "version": made["version"],
        "git_commit": made["git_commit"],
        "command": made["command"],
        "files": {"safetensors": "model.safetensors", "state_dict": "model.pt"},
        "checked": f"outputs equal {call} loaded from both files, on a random batch of {tuple(x.shape)}",
    }
    with _writing(path):
        checkpoint.write_json(out / "model.json", card)
    return card


@contextlib.contextmanager
def _writing(source: Path):
    """A file of the export that cannot be written (a full disk): one line, which also says that the
    exported checkpoint is untouched (write_atomic leaves no partial file behind)."""
    try:
        yield
    except WriteError as e:
        raise UserError(f"{e}; the checkpoint {source} is unchanged") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dhm_fast.export", description="Strip a run's branches and "
                                     "write the plain network (safetensors + stock state dict) with a model card.")
    parser.add_argument("checkpoint", help="a dhm_fast checkpoint, e.g. RUN/best.pt")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        card = export_run(args.checkpoint, args.out)
    except (UserError, ValueError, OSError) as e:  # OSError: an output folder that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {card['architecture']} ({card['method']}) to {args.out}: model.safetensors, model.pt, "
          f"model.json; {card['checked']}")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
