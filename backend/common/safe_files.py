"""Files that appear whole or not at all, with their permissions from the first byte."""

from __future__ import annotations

import os
from pathlib import Path


def create_exclusive(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` with ``mode`` (O_EXCL: never through an existing file or a planted link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a new file beside ``path``, then rename it over ``path``: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        create_exclusive(tmp, data, mode)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
