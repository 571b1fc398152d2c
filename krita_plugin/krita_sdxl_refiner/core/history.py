"""The results history: every result since Krita started, applied or not. Pure Python.

An entry keeps what the docker shows (name, prompt, seed, strength, time, where it went, a small
thumbnail) and, while the memory budget allows, the full pixels: the result (for "Apply" and "Open
as document") and the job it came from with its captured source pixels (for "Again with a new
seed"). :meth:`History.enforce_budget` is the one place that decides which pixels are dropped.

Budget rule: the entries' pixels together stay under ``PIXEL_BUDGET`` bytes (buffers shared by
entries of one capture count once). Over budget, the oldest entries give up their pixels first:
an applied result drops its result and source pixels (the result is in a document already; the
thumbnail and settings stay); a result that was never applied drops only its source snapshot, so
a result is never lost. The newest entry always keeps everything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from krita_sdxl.protocol.geometry import Box

from .jobs import Job, Target
from .pixelformat import PixelFormat

PIXEL_BUDGET = 256 * 2**20  # bytes of full pixels kept in the history (thumbnails and settings are extra)
THUMBNAIL_SIDE = 96  # px, the longer side of a history thumbnail


def buffer_size(buffer: Any) -> int:
    if buffer is None:
        return 0
    if callable(getattr(buffer, "size", None)):  # QByteArray
        return int(buffer.size())
    return memoryview(buffer).nbytes


@dataclass
class Entry:
    id: str  # the job id
    name: str  # its layer name
    job: Job | None  # the finished job with its captured pixels (None: dropped to save memory)
    box: Box  # where the result lies in its document
    fmt: PixelFormat
    profile: str
    target: Target
    data: Any | None  # the result's pixels, ``fmt`` over ``box`` (None: dropped to save memory)
    prompt: str
    seed: int | None
    strength: float
    mode: str
    elapsed: float | None = None
    number: int = 0  # the job's "#3", as in its layer's name
    created: float = field(default_factory=time.time)  # wall clock, for the "14:02" shown
    applied: bool = False  # added to a document at least once
    note: str = ""  # where it went, or why it was kept: for people
    layer_ids: list[Any] = field(default_factory=list)  # layers made from it in its own document, newest last
    documents: list[Any] = field(default_factory=list)  # documents it was added to (opaque handles)
    thumbnail: Any = None  # as the view shows it (a QImage in Krita: the Pictures port makes it)

    @property
    def has_pixels(self) -> bool:
        return self.data is not None

    @property
    def can_again(self) -> bool:
        return self.job is not None and bool(self.job.images)

    def belongs_to(self, document: Any) -> bool:
        """Made from, or added to, ``document``."""
        return any(d is not None and d == document for d in (self.target.document, *self.documents))

    @property
    def capture_id(self) -> str:
        return self.job.capture_id if self.job is not None else self.id

    def buffers(self) -> list[Any]:
        out = [self.data] if self.data is not None else []
        if self.job is not None:
            out += [image.data for image in self.job.images.values()]
        return out

    def drop_pixels(self) -> None:
        self.data = None
        self.drop_source()

    def drop_source(self) -> None:
        if self.job is not None:
            self.job.images = {}  # the job may still be listed in the queue view
        self.job = None


def _same_layer(a: Target, b: Target) -> bool:
    """Both results come from the same layer of the same document."""
    return (
        a.source == b.source == "layer"
        and a.node_id is not None
        and a.node_id == b.node_id
        and a.document is not None
        and a.document == b.document
    )


class History:
    def __init__(self, budget: int = PIXEL_BUDGET) -> None:
        self._entries: list[Entry] = []  # oldest first
        self.budget = budget

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: Entry) -> list[Entry]:
        """Add the newest entry; returns the entries that gave up pixels to stay in budget."""
        self._entries.append(entry)
        return self.enforce_budget()

    def get(self, entry_id: str) -> Entry | None:
        return next((e for e in self._entries if e.id == entry_id), None)

    def remove(self, entry_id: str) -> Entry | None:
        entry = self.get(entry_id)
        if entry is not None:
            self._entries.remove(entry)
        return entry

    def newest_first(self, keep: Callable[[Entry], bool] = lambda _e: True) -> list[Entry]:
        return [e for e in reversed(self._entries) if keep(e)]

    def layers_of_source(self, target: Target, capture_id: str) -> tuple[Any, ...]:
        """The result layers made earlier from the same source, newest first: every result of the same
        capture (Again, Resubmit) and, for a layer source, every result of that layer in that document.
        A new result goes directly above the topmost of them that still exists, so three quick Refines
        stack newest on top, as Again does (the adapter picks the topmost)."""
        ids: list[Any] = []
        for entry in self._entries:
            if entry.capture_id == capture_id or _same_layer(entry.target, target):
                ids += entry.layer_ids
        return tuple(reversed(ids))

    def pixel_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for entry in self._entries:
            for buffer in entry.buffers():
                if id(buffer) not in seen:
                    seen.add(id(buffer))
                    total += buffer_size(buffer)
        return total

    def enforce_budget(self) -> list[Entry]:
        dropped: list[Entry] = []
        for entry in self._entries[:-1]:  # oldest first; the newest keeps everything
            if self.pixel_bytes() <= self.budget:
                break
            if entry.job is None and (entry.data is None or not entry.applied):
                continue  # nothing it may give up
            if entry.applied:
                entry.drop_pixels()
            else:
                entry.drop_source()
            dropped.append(entry)
        return dropped
