"""What the host application lends the workflow: timers on its event loop, work off its UI thread, pictures
for the view and the CURVE key files (Qt's and zmq's versions are in ``adapters``; the composition root
hands them over)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from krita_sdxl.protocol import ImageSpec


class Repeating(Protocol):
    def stop(self) -> None: ...


class Timers(Protocol):
    def later(self, ms: int, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` once, ``ms`` milliseconds from now (0: once control is back in the event loop)."""
        ...

    def repeat(self, ms: int, fn: Callable[[], Any]) -> Repeating:
        """Call ``fn()`` every ``ms`` milliseconds, from now until the returned timer is stopped."""
        ...


class Background(Protocol):
    def run(self, work: Callable[[], Any], done: Callable[[Any], Any]) -> None:
        """Run ``work()`` off the UI thread, then ``done(result)`` on the UI thread (``done(exception)``
        when ``work`` raised one). ``work`` must not touch the view."""
        ...


class Pictures(Protocol):
    """Pixels as the view shows them (QImage in Krita); opaque to the workflow."""

    def preview(self, spec: ImageSpec, data: Any) -> Any | None:
        """A step's preview frame; None for a format that is not shown."""
        ...

    def thumbnail(self, width: int, height: int, rgba: bytes) -> Any:
        """A results thumbnail from 8-bit RGBA bytes."""
        ...


class KeyFiles(Protocol):
    """This computer's CURVE key pair, created once, on demand."""

    def ensure_client_keys(self, folder: Path) -> Path: ...
    def public_key_text(self, secret_file: str | Path) -> str: ...
