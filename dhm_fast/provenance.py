"""What produced a checkpoint: the project's version, its git commit and the exact command line."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import dhm_fast

_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """HEAD of the checkout holding this package (``+dirty`` with uncommitted changes), or None."""
    try:
        run = dict(cwd=_ROOT, capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "HEAD"], check=True, **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=True, **run).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # an installed package, or no git
    return head + ("+dirty" if dirty.strip() else "")


def provenance() -> dict[str, str | None]:
    return {"version": dhm_fast.__version__, "git_commit": git_commit(), "command": shlex.join(sys.orig_argv)}
