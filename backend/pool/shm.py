"""Shared-memory buffers: a job's pixels between the service and a replica on the same host, without the
object store. Pure: no Ray.

Ray's object store costs about 6 ms per 4 MiB ``ray.put`` on a busy host (one per direction per job);
writing the same 4 MiB into a mapped file in /dev/shm costs 0.2 ms. A dispatcher slot (one job at a time)
owns two files, mode 0600: ``in`` (image and mask, written by the slot) and ``out`` (the result, written
by the replica). They are reused from job to job while each job ends normally (the replica has finished
reading and writing them by the time its last event arrives) and replaced after a job that ends any other
way (cancelled, its replica lost, timed out), so that a straggling replica only ever writes a file nobody
reads again. A replica that cannot open a slot's file (another host, another user, another /dev/shm)
says so and gets the pixels through the object store (backend/pool/transfer.py).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

ROOT = Path("/dev/shm")
PREFIX = "krita-sdxl-pool-"


def available() -> bool:
    return ROOT.is_dir() and os.access(ROOT, os.W_OK)


class Segment:
    """A file in /dev/shm of ``size`` bytes, mapped read-write."""

    def __init__(self, path: Path, size: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.path = path
        self.size = size

    def write(self, offset: int, data: memoryview) -> None:
        self.map[offset : offset + data.nbytes] = data

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self.map)[offset : offset + nbytes]

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view still in use: the mapping goes with the last one
            self.map.close()

    def unlink(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class SlotBuffers:
    """A dispatcher slot's ``in`` and ``out`` files (created on demand, at least as large as asked)."""

    def __init__(self, tag: str, on_create: Callable[[str], None] | None = None) -> None:
        self.tag = tag
        self._on_create = on_create
        self.input: Segment | None = None
        self.output: Segment | None = None

    def _make(self, role: str, size: int) -> Segment:
        path = ROOT / f"{PREFIX}{self.tag}-{role}-{secrets.token_hex(4)}"
        segment = Segment(path, max(size, 1), create=True)
        if self._on_create is not None:
            self._on_create(str(path))
        return segment

    def for_input(self, size: int) -> Segment:
        if self.input is None or self.input.size < size:
            self._drop("input")
            self.input = self._make("in", size)
        return self.input

    def for_output(self, size: int) -> Segment:
        if self.output is None or self.output.size < size:
            self._drop("output")
            self.output = self._make("out", size)
        return self.output

    def _drop(self, role: str) -> None:
        segment = getattr(self, role)
        if segment is not None:
            segment.unlink()
            segment.close()
            setattr(self, role, None)

    def retire(self) -> None:
        """After a job that did not end normally: new files for the next job."""
        self._drop("input")
        self._drop("output")


class Mappings:
    """The replica's side: the slots' files it has mapped, one per slot and role (a slot's files are reused
    from job to job, so a job maps nothing new and takes no page faults; a slot's new file replaces its old
    mapping, so a replaced file's memory is freed), the most recent few slots kept."""

    def __init__(self, keep: int = 16) -> None:
        self._keep = keep
        self._open: OrderedDict[str, Segment] = OrderedDict()  # by slot and role (the name less its suffix)

    def get(self, name: str, size: int) -> Segment:
        """The file ``name`` (only a PREFIX file in ROOT), mapped; OSError when this host cannot open it."""
        if "/" in name or not name.startswith(PREFIX):
            raise PermissionError(f"not a pool buffer: {name!r}")
        stem = name.rpartition("-")[0]
        segment = self._open.get(stem)
        if segment is None or segment.path.name != name or segment.size < size:
            if segment is not None:
                segment.close()
                del self._open[stem]
            segment = Segment(ROOT / name, size, create=False)
            if segment.size < size:
                segment.close()
                raise OSError(f"{name}: {segment.size} bytes, {size} expected")
            self._open[stem] = segment
        self._open.move_to_end(stem)
        while len(self._open) > self._keep:
            _, old = self._open.popitem(last=False)
            old.close()
        return segment
