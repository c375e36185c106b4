"""Files and directories only plunkd's user can read: the modes plunkd makes them with, whatever the umask."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PRIVATE_UMASK = 0o077
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path) -> Path:
    """`path` made (with its parents) if absent; a new directory is 0700 whatever the umask."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    return path


def write_private_file(path: Path, text: str, replace: bool = True) -> bool:
    """Write `text` to `path` (0600) atomically: a staged file, fsynced, then renamed over `path`, or with
    `replace=False` linked to it only if no file is there yet. Returns whether `path` now holds `text`."""
    private_dir(path.parent)
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(staged, path)
            return True
        try:
            os.link(staged, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
