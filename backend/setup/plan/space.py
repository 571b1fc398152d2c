"""Whether the disks have room for what the setup will write, checked before anything is written.

What goes where (the environment's folder, the Hugging Face cache) is summed per disk, since both
may be on the same one, and compared with that disk's free space less a margin.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

MARGIN_BYTES = 128 * 2**20  # left free on top of what is needed
MARGIN_SHARE = 0.02


@dataclass(frozen=True)
class Need:
    path: Path  # where it is written (need not exist yet)
    bytes: int
    what: str  # for people: "PyTorch and the backend", "the SDXL refiner"
    elsewhere: str = "choose another folder"  # how to put it on another disk


def human(n: float) -> str:
    """Bytes for people, in decimal units as download sites show them: 6.08 GB, 512 MB, 900 kB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{2 if unit in ('TB', 'GB') else 0}f} {unit}"
    return f"{int(n)} bytes"


def nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(nearest_existing(path)).free


def device_of(path: Path) -> object:
    return os.stat(nearest_existing(path)).st_dev


def margin(needed: int) -> int:
    return MARGIN_BYTES + int(needed * MARGIN_SHARE)


def check_space(
    needs: Iterable[Need],
    free: Callable[[Path], int] | None = None,
    device: Callable[[Path], object] | None = None,
) -> list[str]:
    """One message per disk that lacks room (empty when all fit). ``free`` and ``device`` read the
    disk (default: :func:`free_bytes`, :func:`device_of`; injected so a test can fake a full one)."""
    free = free or free_bytes
    device = device or device_of
    disks: dict[object, list[Need]] = {}
    for need in needs:
        if need.bytes > 0:
            disks.setdefault(device(need.path), []).append(need)
    problems = []
    for group in disks.values():
        total = sum(n.bytes for n in group)
        have = free(group[0].path)
        if have < total + margin(total):
            where = " and ".join(f"{n.what} ({human(n.bytes)} in {n.path})" for n in group)
            ways = " or ".join(dict.fromkeys(n.elsewhere for n in group))
            problems.append(
                f"Not enough disk space: {where} need {human(total + margin(total))} with a safety margin, "
                f"but only {human(have)} is free on that disk. Free some space, or {ways}."
            )
    return problems
