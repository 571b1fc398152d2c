"""Change detection for live refine: which pixels to watch, in bands, and when the canvas is still. Pure.

The watched area is what a refine would send: the selection's padded crop, or the whole canvas without
a selection. It is read in horizontal bands of at most ``BAND_PIXELS`` pixels, one band per check, and
each band is compared byte for byte with what it held at the last check (``==`` on the buffers: a memcmp,
about 1 ms for 16 MiB): no change is missed, and a check costs one band's read whatever the canvas size.
A 1448x1448 canvas is one band; 2048x2048 two, 4096x4096 eight (a change there is seen within eight checks).
The selection's bounds and mask are compared at every check.

Source: Layer reads the source layer. Source: Image cannot read the image: the opaque preview on top hides
what changes under it. It reads the layer being painted on (the active one) and compares, at every check,
every layer's visibility, opacity and blending and Krita's undo stack (which every edit of any layer goes
through); the preview is left out of all of it.

:class:`Stillness` is the debounce: a job starts once nothing has changed for ``wait`` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from krita_sdxl.protocol.geometry import Box, Extent, crop_for_selection

BAND_PIXELS = 2048 * 1024  # the most pixels one check reads (8 MiB of 8-bit RGBA: about 1.5 ms to read and compare)
FAST_S = 2.0  # after a change, check at every tick for this long ...
IDLE_CHECK_S = 0.1  # ... then at most this often


def watched_box(canvas: Extent, selection: Box | None, padding_fraction: float) -> Box:
    """What a refine would read: the selection's padded crop (as ``core.plan``), else the canvas."""
    if selection is not None and not selection.clamp(canvas).is_empty:
        return crop_for_selection(selection.clamp(canvas), canvas, padding_fraction=padding_fraction)
    return Box.from_extent(canvas)


def bands(box: Box, max_pixels: int = BAND_PIXELS) -> list[Box]:
    """``box`` cut into horizontal bands of at most ``max_pixels`` pixels (at least one row each)."""
    if box.is_empty:
        return []
    rows = max(1, max_pixels // max(1, box.width))
    return [Box(box.x, y, box.width, min(rows, box.bottom - y)) for y in range(box.y, box.bottom, rows)]


@dataclass(frozen=True)
class Shape:
    """What is compared at every check besides the pixels: the canvas, the selection and its mask, and for
    Source: Image the layers and the undo history (the preview covers the image: its pixels cannot tell)."""

    canvas: Extent
    selection: Box | None
    mask: Any = field(default=None, compare=False)  # the selection's bytes over its bounds (opaque buffer)
    layers: tuple[Any, ...] = ()  # Source: Image: each layer's id, visibility, opacity, blending (not the preview)
    history: Any = None  # Source: Image: Krita's undo stack (its length and position) while the document is shown
    reader: Any = field(default=None, compare=False)  # whose pixels are read: another is a new baseline, no change

    def same(self, other: Shape | None) -> bool:
        return other is not None and self == other and _same_bytes(self.mask, other.mask)


def _same_bytes(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return bool(a == b)


class Watch:
    """The watched area's last-seen bands; :meth:`check` reads the next band and says whether it changed."""

    def __init__(self) -> None:
        self.shape: Shape | None = None
        self.boxes: list[Box] = []
        self.seen: list[Any] = []
        self.next = 0

    def reset(self, shape: Shape, box: Box, read: Any) -> None:
        """Start over on ``box`` (``read(band) -> buffer``): every band read once, as the baseline."""
        self.shape = shape
        self.boxes = bands(box)
        self.seen = [read(b) for b in self.boxes]
        self.next = 0

    def check(self, shape: Shape, box: Box, read: Any) -> bool:
        """True when something changed: the shape, the area, or the next band's bytes. A changed shape or
        area takes a new baseline at once (the next job reads it anyway); so does another ``reader`` (the
        artist chose another layer to paint on: nothing changed yet)."""
        if not shape.same(self.shape) or bands(box) != self.boxes:
            self.reset(shape, box, read)
            return True
        if self.shape is None or shape.reader != self.shape.reader:
            self.reset(shape, box, read)
            return False
        if not self.boxes:
            return False
        i = self.next
        self.next = (i + 1) % len(self.boxes)
        now = read(self.boxes[i])
        changed = not _same_bytes(now, self.seen[i])
        self.seen[i] = now
        return changed


class Stillness:
    """The debounce: ``due`` once ``wait_s`` have passed since the last change with nothing new since."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self.pending = False
        self.changed_at = 0.0  # the last change seen (stroke end, as far as the checks can tell)

    def changed(self, now: float) -> None:
        self.pending = True
        self.changed_at = now

    def due(self, now: float) -> bool:
        return self.pending and now - self.changed_at >= self.wait_s

    def fired(self) -> None:
        self.pending = False

    def busy(self, now: float) -> bool:
        """Check at every tick (a stroke may be under way), or only every ``IDLE_CHECK_S``."""
        return self.pending or now - self.changed_at < FAST_S
