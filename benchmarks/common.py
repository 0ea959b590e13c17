"""What every benchmark shares: device-synchronised timing, summary statistics, the machine and command a
figure was measured with, flags generated from a settings dataclass, one-line errors and figure files."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shlex
import statistics
import sys
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from dhm_fast.errors import UserError
from dhm_fast.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")  # environment variables that cap the CPU code


# --- timing ---------------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a host clock read brackets it (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict[str, Callable[[], object]], device: torch.device | str, repeats: int,
                     warmup: int = 0, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each call of each fn, timed in interleaved rounds so that every fn sees the same
    background load (the machines are shared); `warmup` untimed calls of each first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            sync(device)
            times[name].append(clock() - start)
    return times


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """median, quartiles, IQR, min, max and count of a non-empty list."""
    v = sorted(values)
    if not v:
        raise ValueError("quantiles of an empty list")
    q1, q3 = (v[0], v[0]) if len(v) == 1 else statistics.quantiles(v, n=4, method="inclusive")[::2]
    return {"median": statistics.median(v), "q25": q1, "q75": q3, "iqr": q3 - q1, "min": v[0], "max": v[-1],
            "n": len(v)}


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout holds only the result table."""
    print(msg, file=sys.stderr, flush=True)


# --- environment ----------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name (Linux); platform.processor() often says only "x86_64"."""
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")] \
        if info.is_file() else []
    return names[0] if names else platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, `python -m MODULE ARGS` (ARGS: sys.argv when None), with
    absolute paths inside the repository made relative (no machine's paths in tracked result files)."""
    def portable(arg: str) -> str:
        path = Path(arg)
        return str(path.resolve().relative_to(ROOT)) if path.is_absolute() and path.resolve().is_relative_to(ROOT) \
            else arg

    return shlex.join(["python", "-m", module, *map(portable, sys.argv[1:] if argv is None else argv)])


def environment(device: torch.device | str = "cpu", module: str | None = None,
                argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The machine, software and command a measurement was taken with."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "device": str(device), "device_name": device_name(device), "cpu_model": cpu_model(),
        "machine": platform.machine(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        # Which vector code ran: torch's own kernels (ATEN_CPU_CAPABILITY caps it) and oneDNN's
        # (ONEDNN_MAX_CPU_ISA caps it): a capped run stands in for an older CPU (docs/configuration.md).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_limits": {name: os.environ[name] for name in ISA_LIMITS if name in os.environ},
    }
    if module is not None:
        env["command"] = command_line(module, argv)
    return env


# --- command line and figures -----------------------------------------------------------------------


def option(default: Any, help: str = "", choices: tuple | None = None, ge: float | None = None) -> Any:
    """A setting of a benchmark: its flag (--a-b for field a_b) is generated from this declaration."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "ge": ge})


def parse_settings(settings: type[T], module: str, doc: str, argv: Sequence[str] | None) -> T:
    """The dataclass `settings` from `python -m MODULE`'s command line `argv` (None: sys.argv): one flag
    per field; `doc`'s first paragraph describes the command."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        flag, meta, hint = "--" + f.name.replace("_", "-"), f.metadata, hints[f.name]
        kind = next(t for t in (bool, int, float, Path, str) if t is hint or t in typing.get_args(hint))
        text = meta["help"] or "(default: %(default)s)"  # argparse would show neither help nor default
        if kind is bool:
            p.add_argument(flag, action="store_true", help=text)
            continue
        long_choices = meta["choices"] and len(meta["choices"]) > 6  # a metavar keeps the usage line short
        p.add_argument(flag, type=kind, default=f.default, choices=meta["choices"], help=text,
                       metavar=f.name.upper() if long_choices else None)
    return settings(**vars(p.parse_args(argv)))


def check(settings: Any) -> None:
    """Every declared choice and lower bound, also of settings built without the command line."""
    for f in dataclasses.fields(settings):
        value, meta = getattr(settings, f.name), f.metadata
        if meta["choices"] and value not in meta["choices"]:
            raise ValueError(f"unknown {f.name} {value!r}; choose one of {', '.join(meta['choices'])}")
        if meta["ge"] is not None and value is not None and value < meta["ge"]:
            raise ValueError(f"--{f.name.replace('_', '-')} must be at least {meta['ge']}, got {value}")


def output_folder(path: str | Path, flag: str = "--out") -> Path:
    """`path` as a folder, made if missing. Called before any measurement: a bad --out loses no work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def cli(run: Callable[[], object]) -> int:
    """Exit status of `run()`: bad input (ValueError, UserError, a file that cannot be read or written) is
    one line and 2."""
    try:
        run()
    except (ValueError, OSError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


@contextlib.contextmanager
def figure(path: Path, dpi: int = 120, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """(figure, axes) of `plt.subplots(**subplots)`, laid out and written to `path` on exit."""
    import matplotlib

    matplotlib.use("Agg")  # files only; chosen at call time so that importing a benchmark changes nothing
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    yield fig, axes
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
