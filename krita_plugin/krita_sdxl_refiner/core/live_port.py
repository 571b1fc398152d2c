"""The live document port: what live refine needs from the document side. No Krita import here:
``adapters.krita_live.KritaLive`` implements it in Krita, tests use a fake.

A *session* is opaque to the workflow: the document, the source (a layer, or the visible image) and the
one preview layer, made when Live is turned on and removed when it is turned off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from krita_sdxl.protocol.geometry import Box

from .document import Capture, Placed, Planner
from .live_watch import Shape
from .pixelformat import PixelFormat

PREVIEW_NAME = "Live preview"


class LiveBusy(Exception):
    """Krita is busy with a stroke (the artist's pen is down): try again in a moment. Nothing changed."""


class LiveGone(Exception):
    """The session cannot go on (its document was closed, its source layer or preview layer deleted or
    undone away); the message says which, for the artist."""


class LivePort(Protocol):
    def start(self, source: str) -> Any:
        """A session on the active document: ``source`` "layer" (the active layer) or "canvas". Makes the
        empty preview layer directly above the source (at the top for the canvas) and keeps the source
        layer active. Raises ``core.document.AdapterError`` / ``UnsupportedFormat`` with the reason."""
        ...

    def shape(self, session: Any) -> Shape:
        """The canvas, the selection's bounds and its mask, now. Raises :class:`LiveGone`."""
        ...

    def read(self, session: Any, box: Box) -> Any:
        """The source's pixels over ``box`` as a comparable buffer (for change detection only)."""
        ...

    def capture(self, session: Any, planner: Planner) -> Capture:
        """As ``Adapter.capture``, from the session's source, never including the preview layer.
        Raises :class:`LiveBusy` while a stroke is under way."""
        ...

    def show(self, session: Any, box: Box, fmt: PixelFormat, data: Any) -> None:
        """Put a result into the preview layer, in place: no new layer, no undo step. Raises
        :class:`LiveBusy` (a stroke is under way) or :class:`LiveGone`."""
        ...

    def apply(self, session: Any, name: str, box: Box, data: Any) -> Placed:
        """A normal result layer (one undo step) with ``data`` over ``box``, directly below the preview."""
        ...

    def notify(self, session: Any, poke: Callable[[], None]) -> None:
        """Call ``poke()`` when the document signals an edit (optional: the checks see every change anyway;
        a signal only sees it sooner)."""
        ...

    def stop(self, session: Any) -> None:
        """Remove the preview layer (if it is still there). Never raises."""
        ...
