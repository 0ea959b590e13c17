"""Errors caused by the user's input: the command line prints them as one line and exits with 2."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Bad flag, missing data, wrong checkpoint...: a message meant for the person at the terminal."""


class WriteError(UserError):
    """An output that could not be written (a full disk, a lost mount, no permission), named with the cause.

    The writer knows the file; the caller appends what is still good (e.g. the last checkpoint).
    """

    def __init__(self, path: str | Path, error: OSError) -> None:
        self.path, self.cause = Path(path), os_cause(error)
        super().__init__(f"cannot write {path}: {self.cause}")


def os_cause(error: OSError) -> str:
    """'no space left on device', 'permission denied', ...: the system's words for an OSError."""
    return os.strerror(error.errno).lower() if error.errno else (str(error) or type(error).__name__)
