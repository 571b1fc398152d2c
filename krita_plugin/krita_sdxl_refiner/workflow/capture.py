"""Reading a capture's pixels: a small one at once, a large one off the UI thread; a capture with nothing
visible where it would be refined is refused (its message says why). Pure: the thread comes from the
``core.host.Background`` port."""

from __future__ import annotations

from ..core.document import Capture
from ..core.pixelformat import any_visible
from ..core.plan import NothingToRefine, nothing_visible

INLINE_BYTES = 8 * 2**20  # read at once up to this (2 megapixels of 8-bit RGBA: a few milliseconds)


def reads_at_once(capture: Capture) -> bool:
    """Small enough to read on the UI thread (or read already)."""
    return capture.reader is None or capture.nbytes <= INLINE_BYTES


def read_checked(capture: Capture, from_noise: bool) -> Capture:
    """Read the pixels (on any thread) and refuse a capture with nothing visible to refine; a job that
    paints from noise needs nothing there. Raises :class:`NothingToRefine`."""
    capture.read()
    if not from_noise and not any_visible(capture.fmt, capture.pixels, capture.mask):
        target = capture.target
        raise NothingToRefine(nothing_visible(target.source, target.description, capture.mask is not None))
    return capture
