"""Checkpoints that survive crashes and refuse to run code.

Writes go to a temporary file in the same folder, are flushed and fsync'ed, then renamed over the
target (atomic on POSIX), so a crash mid-write leaves the previous checkpoint intact and a failed write
(a full disk) leaves no temporary file. Loading always uses `weights_only=True`: a pickle that would
execute code is refused with a clear message.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import pickletools
import random
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from dhm_fast.errors import UserError, WriteError

LAST = "last.pt"
BEST = "best.pt"

_UMASK = os.umask(0o022)  # read once, at import (setting it is process-wide): a written file's permissions
os.umask(_UMASK)


def save_atomic(obj: Any, path: str | Path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call write(file) on a temporary file beside path, fsync it, then rename it over path.

    Any OSError (a full disk, a lost mount) becomes a WriteError naming path and the cause; the
    temporary file is removed and path keeps its previous content.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes it private to its owner)
        with os.fdopen(fd, "wb") as raw:
            f = _KeepsWriteErrors(raw)
            try:
                write(f)
            except RuntimeError:  # torch's zip writer reports a failed write without its cause
                if f.error is None:
                    raise
                raise f.error from None
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(path, e) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable, where the folder can be synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, written atomically (write_atomic)."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


class _KeepsWriteErrors:
    """A file that remembers the OSError of a failed write (torch turns it into 'unexpected pos ...')."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's contents, loaded without running any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not _may_hold_python_objects(path):
            raise UserError(f"checkpoint {path} is not a PyTorch checkpoint (not in torch.save's format)") from None
        raise UserError(f"refusing to load {path}: it holds Python objects beyond tensors and plain "
                        f"containers, and unpickling it could run code{_unpickler_detail(e)}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__})") from None
    except Exception as e:  # the weights-only unpickler fed bytes that are no pickle: IndexError, KeyError, ...
        if _may_hold_python_objects(path):
            raise UserError(f"checkpoint {path} is corrupt ({type(e).__name__} while reading it)") from None
        raise UserError(f"checkpoint {path} is not a PyTorch checkpoint (not in torch.save's format)") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a dhm_fast checkpoint")
    return obj


# The pickle opcodes that import or call Python objects: what makes unpickling a file unsafe.
_OBJECT_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def _may_hold_python_objects(path: Path) -> bool:
    """Whether a file torch.load refused is torch.save's zip archive or its legacy pickle (protocol 2+),
    or a pickle that imports Python objects (read opcode by opcode: nothing runs); False for a file
    that is no pickle at all (a wrong or corrupt file)."""
    if zipfile.is_zipfile(path):
        return True
    try:
        with path.open("rb") as f:
            if f.read(1) == pickle.PROTO:
                return True
            f.seek(0)
            return any(op.name in _OBJECT_OPCODES for op, _, _ in pickletools.genops(f))
    except Exception:  # the opcode reader stops at the first byte that is not pickle
        return False


def _unpickler_detail(error: Exception) -> str:
    """The line of torch's refusal that names what the file holds, e.g. ' (Unsupported global: ...)'."""
    found = [line.strip() for line in str(error).splitlines() if line.strip().startswith("Unsupported")]
    return f" ({found[0]})" if found else ""


def model_state(obj: dict) -> dict:
    """The model weights in a checkpoint: ours ({"model": ...}) or a bare state dict."""
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("checkpoint holds no model state dict")
    return state


def rng_state() -> dict:
    """This process's random streams: torch's CPU generator, Python's, and its own GPU's generator.

    Only the current device's CUDA generator is saved: the other visible GPUs belong to other processes,
    and a resumed job may see fewer of them (SLURM's one GPU per task, fewer processes).
    """
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        device = torch.cuda.current_device()
        torch.cuda.set_rng_state(_own_cuda_state(state["cuda"], device), device)


def _own_cuda_state(saved: torch.Tensor | list, device: int) -> torch.Tensor:
    """The generator state for `device`. Older checkpoints hold a list, one state per GPU the saving
    process saw: its own is at its device index when the layout is unchanged, else the first."""
    if isinstance(saved, torch.Tensor):
        return saved
    return saved[device] if device < len(saved) else saved[0]


def _as_tuple(x: Any) -> Any:
    # random.setstate wants tuples all the way down; serialisation may hand back lists.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_model_weights(model: torch.nn.Module, state: dict, source: str, expected: str) -> None:
    """Load weights, turning a shape/name mismatch into one line naming both architectures."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or bad_shapes:
        detail = (missing or unexpected or bad_shapes)[0]
        raise UserError(
            f"{source} does not fit a {expected} model (first mismatch: {detail}); "
            f"was it trained with another --arch, --method or class count?"
        )
    model.load_state_dict(state, strict=True)
