"""The document port: what the workflow needs from the document side, and what it gets back. No Krita
import here: ``adapters.krita_adapter.KritaAdapter`` implements it in Krita, tests use a fake."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from krita_sdxl.protocol.geometry import Box, Extent

from .jobs import Target
from .pixelformat import PixelFormat
from .plan import RefinePlan


class AdapterError(Exception):
    """The document side cannot do what was asked; the message is for the artist."""


class NotApplied(Exception):
    """A result could not go where it was meant to (its document was closed, its layer deleted...).
    The message says why, in words for the artist; nothing was changed."""


@dataclass
class Capture:
    """What the adapter took from the document for one job: where and how (read on the UI thread, at
    once), and the pixels, read by ``reader`` when the adapter leaves that for later (a 6000x4000 layer
    takes a third of a second to copy: the workflow runs the reader off the UI thread)."""

    plan: RefinePlan
    fmt: PixelFormat
    profile: str
    transfer: str  # "srgb" or "linear"
    pixels: Any | None  # buffer, fmt sized over plan.crop (None until read)
    mask: Any | None  # L8 buffer over plan.crop, or None
    target: Target
    reader: Callable[[], tuple[Any, Any | None]] | None = None  # (pixels, mask); safe off the UI thread

    @property
    def nbytes(self) -> int:
        """The size of the pixels, read or not."""
        return self.plan.crop.width * self.plan.crop.height * self.fmt.bytes_per_pixel

    def read(self) -> None:
        """Read the pixels and the mask, unless they are read already (runs on any thread)."""
        if self.reader is not None:
            self.pixels, self.mask = self.reader()
            self.reader = None


@dataclass(frozen=True)
class Placed:
    """Where a result layer went."""

    layer_id: Any  # the new layer's id (opaque)
    document: str  # its document's name, for messages
    active: bool  # that document is the one shown now
    handle: Any = None  # the document itself (opaque), so the history can show the result there


class Planner(Protocol):
    def __call__(self, canvas: Extent, source_bounds: Box, selection: Box | None) -> RefinePlan: ...


class Adapter(Protocol):
    def read_setting(self, key: str, default: str) -> str: ...
    def write_setting(self, key: str, value: str) -> None: ...
    def capture(self, source: str, planner: Planner) -> Capture: ...
    def apply(self, target: Target, box: Box, fmt: PixelFormat, data: Any, name: str) -> Placed: ...
    def apply_to_active(self, name: str, box: Box, fmt: PixelFormat, data: Any) -> Placed: ...
    def open_as_document(self, name: str, box: Box, fmt: PixelFormat, profile: str, data: Any) -> str: ...
    def scale_document(self, target: Target, expected: Extent, size: Extent) -> None: ...
    def active_document(self) -> Any: ...
