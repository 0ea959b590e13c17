"""--init-weights: start a run's trunk from a local weights file (e.g. ImageNet-pretrained torchvision weights).

The file is read without running code: safetensors, or a torch file through ``weights_only=True``. It may be
a bare state dict, a dhm_fast checkpoint (``{"model": ...}``) or ``{"state_dict": ...}``; a DataParallel
``module.`` prefix is dropped. Names are mapped to the model's: the paper's ImageNet ResNets already use
torchvision's names (``export.to_torchvision`` is a filter), and a backbone trunk (``tv:``/``timm:``) adds
its ``stock_prefix``. Tensors the model lacks are reported as unused; the model's tensors the file lacks
(new branches, a new classifier) keep their random init and are reported as missing. A classifier of
another class count is unused, not an error; any other shape mismatch is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dhm_fast import checkpoint
from dhm_fast.errors import UserError
from dhm_fast.models import unwrap

__all__ = ["InitReport", "load_init_weights", "model_names", "read_weights"]


@dataclass(frozen=True)
class InitReport:
    loaded: list[str]
    missing: list[str]  # the model's tensors left at their init
    unused: list[str]  # the file's tensors with no place in the model
    prefix: str = ""  # a backbone's stock prefix, left out when grouping

    def lines(self) -> list[str]:
        return [f"init weights: {len(self.loaded)} tensors loaded",
                f"init weights: missing (random init): {_summary(self.missing, self.prefix)}",
                f"init weights: unused from the file: {_summary(self.unused, self.prefix)}"]


def _summary(keys: Iterable[str], prefix: str) -> str:
    """``aux1 (30 tensors), fc (2 tensors)``: keys grouped by their top-level module."""
    groups = Counter(key.removeprefix(prefix).split(".")[0] for key in keys)
    return ", ".join(f"{name} ({n} tensor{'s' * (n != 1)})" for name, n in groups.items()) or "none"


def _is_safetensors(path: Path) -> bool:
    # The format starts with an 8-byte header length, then the JSON header.
    with path.open("rb") as f:
        return f.read(9)[8:] == b"{"


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a local weights file, by name; a UserError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as e:
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    obj = checkpoint.load(path)
    state = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict (names mapped to tensors)")
    return dict(state)


def _classifier_keys(model: nn.Module, own: Mapping[str, Tensor]) -> set[str]:
    """The trunk's last Linear layer: a new class count replaces it, so its shape may differ."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("aux")]
    return {k for k in own if names and k.startswith(names[-1] + ".")}


def model_names(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` named as ``model`` names it: no ``module.`` prefix, stock names under a backbone's prefix."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    prefix = getattr(unwrap(model), "stock_prefix", "")
    if prefix and not any(k.startswith(prefix) for k in state):
        state = {prefix + k: v for k, v in state.items()}
    return state


def load_init_weights(model: nn.Module, source: str | Path | Mapping[str, Tensor]) -> InitReport:
    """Copy the matching tensors of ``source`` (a path or a state dict) into ``model``; see the module doc."""
    model = unwrap(model)
    state = model_names(model, read_weights(source) if isinstance(source, str | Path) else source)
    own = model.state_dict()
    classifier = _classifier_keys(model, own)
    loaded, unused = {}, []
    for key, value in state.items():
        if key not in own or (key in classifier and value.shape != own[key].shape):
            unused.append(key)
        elif value.shape != own[key].shape:
            raise UserError(f"weights file: '{key}' has shape {tuple(value.shape)}, the model's is "
                            f"{tuple(own[key].shape)}; was it made for another architecture?")
        else:
            loaded[key] = value
    if not loaded:
        raise UserError(f"the weights file shares no tensor with this model (its first: {next(iter(state), 'none')})")
    with torch.no_grad():
        model.load_state_dict(loaded, strict=False)
    missing = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
    return InitReport(list(loaded), missing, unused, getattr(model, "stock_prefix", ""))
