"""Writing files so that a reader, a crash or a full disk never leaves half of one: every
output goes to a temporary name beside its place and is renamed into it. The one place
effusion writes files through (run-directory JSON/YAML, sample grids, arrays)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from effusion.config import ConfigError


class OutputError(ConfigError):
    """An output file could not be written (a folder that is a file or read-only, a full
    disk); nothing half-written is left behind."""


def check_writable(path: str | Path) -> Path:
    """Fail before any work if `path`'s folder cannot be made or written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"cannot write {path}: folder {path.parent} is not writable")
    return path


def write_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` to a temporary name beside `path`, then rename it into place; on any
    OS error (read-only folder, full disk) the temporary file is removed and an
    OutputError names the file."""
    path = check_writable(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # keeps the suffix (the format)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
