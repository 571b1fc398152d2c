"""Crop, work-size and feather policy for refining a selection: immutable values and pure functions.

Everything is in document pixels. No pixels are touched here: the Krita plugin uses these to decide
what to send, the service to check what it gets. Standard library only (runs in Krita's Python 3.10).

- :func:`crop_for_selection`: the selection's bounds plus context padding, clamped to the canvas,
  with a width and height that are multiples of 8 wherever the canvas is large enough.
- :func:`work_size`: the size the model runs at, near one megapixel, sides multiples of 8, aspect kept.
- :func:`feather_radius`: the inward feather of the selection edge, scaled by strength.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

# Defaults (FACTS.md section 6: what the most used Krita AI plugin does, adapted to the SDXL refiner).
PADDING_FRACTION = 0.06  # context padding: share of the selection's diagonal
MIN_PADDING = 16  # px; even a tiny selection gets some context around it
FEATHER_FRACTION = 0.1  # feather radius at strength 1: share of the selection's diagonal
SNAP = 8  # the VAE downsamples by 8: sizes must be multiples of 8
TARGET_PIXELS = 1024 * 1024  # SDXL (base and refiner) were trained near one megapixel
MIN_WORK_SIDE = 512  # smallest SDXL training bucket side
MAX_WORK_SIDE = 2048  # largest SDXL training bucket side


@dataclass(frozen=True)
class Extent:
    """A width and a height in pixels (never negative)."""

    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width < 0 or self.height < 0:
            raise ValueError(f"an extent cannot be negative: {self.width}x{self.height}")

    def __iter__(self) -> Iterator[int]:
        yield self.width
        yield self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def pixel_count(self) -> int:
        return self.width * self.height

    @property
    def diagonal(self) -> float:
        return math.hypot(self.width, self.height)

    @property
    def shortest_side(self) -> int:
        return min(self.width, self.height)

    @property
    def longest_side(self) -> int:
        return max(self.width, self.height)

    @property
    def is_empty(self) -> bool:
        return self.width == 0 or self.height == 0


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle: top-left corner and size, in pixels. Unpacks as ``x, y, w, h``
    (the argument order of Krita's ``pixelData``/``setPixelData``)."""

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width < 0 or self.height < 0:
            raise ValueError(f"a box cannot have a negative size: {self.width}x{self.height}")

    def __iter__(self) -> Iterator[int]:
        yield self.x
        yield self.y
        yield self.width
        yield self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height} at ({self.x}, {self.y})"

    @staticmethod
    def from_extent(extent: Extent) -> Box:
        return Box(0, 0, extent.width, extent.height)

    @staticmethod
    def from_edges(left: int, top: int, right: int, bottom: int) -> Box:
        return Box(left, top, max(0, right - left), max(0, bottom - top))

    @property
    def right(self) -> int:
        """One past the last column."""
        return self.x + self.width

    @property
    def bottom(self) -> int:
        """One past the last row."""
        return self.y + self.height

    @property
    def extent(self) -> Extent:
        return Extent(self.width, self.height)

    @property
    def is_empty(self) -> bool:
        return self.width == 0 or self.height == 0

    def contains(self, other: Box) -> bool:
        return self.x <= other.x and self.y <= other.y and other.right <= self.right and other.bottom <= self.bottom

    def intersect(self, other: Box) -> Box:
        """The overlap of two boxes; an empty box (size 0) when they do not overlap."""
        left, top = max(self.x, other.x), max(self.y, other.y)
        right, bottom = min(self.right, other.right), min(self.bottom, other.bottom)
        if right <= left or bottom <= top:
            return Box(left, top, 0, 0)
        return Box(left, top, right - left, bottom - top)

    def clamp(self, canvas: Extent) -> Box:
        """The part of this box inside a canvas of the given size."""
        return self.intersect(Box.from_extent(canvas))

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer``'s top-left corner."""
        return Box(self.x - outer.x, self.y - outer.y, self.width, self.height)


def snap_up(value: int, multiple: int = SNAP) -> int:
    """The smallest multiple of ``multiple`` that is at least ``value``."""
    return -(-value // multiple) * multiple


def snap_nearest(value: float, multiple: int = SNAP) -> int:
    """The multiple of ``multiple`` nearest to ``value`` (halves round up), never below ``multiple``."""
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def padding_for(selection: Box | Extent, fraction: float = PADDING_FRACTION, minimum: int = MIN_PADDING) -> int:
    """Context padding in pixels: a share of the selection's diagonal, at least ``minimum``."""
    extent = selection.extent if isinstance(selection, Box) else selection
    return max(int(minimum), round(fraction * extent.diagonal))


def _grow_to(start: int, size: int, target: int, limit: int) -> tuple[int, int]:
    """Grow the span [start, start + size) to ``target`` long inside [0, limit), as evenly as
    the limits allow. ``target`` must be at most ``limit``."""
    extra = target - size
    room_before, room_after = start, limit - (start + size)
    before = min(room_before, extra // 2)
    after = min(room_after, extra - before)
    before += extra - before - after  # what did not fit after goes before (always fits)
    return start - before, target


def _snapped_span(start: int, size: int, limit: int, multiple: int) -> tuple[int, int]:
    target = min(snap_up(size, multiple), limit)
    if target <= size:
        return start, size
    return _grow_to(start, size, target, limit)


def crop_for_selection(
    selection: Box,
    canvas: Extent,
    padding: int | None = None,
    *,
    padding_fraction: float = PADDING_FRACTION,
    min_padding: int = MIN_PADDING,
    multiple: int = SNAP,
) -> Box:
    """The area to send for refining a selection: its bounds (clamped to the canvas) grown by
    ``padding`` pixels of context on every side (default :func:`padding_for`), clamped to the canvas,
    then grown outward so that width and height are multiples of ``multiple``. A side of the canvas
    that is shorter than the next multiple is used whole (the size then is not a multiple).

    Raises ValueError when the selection does not overlap the canvas.
    """
    inside = selection.clamp(canvas)
    if inside.is_empty:
        raise ValueError(f"the selection {selection} does not overlap the {canvas} canvas")
    pad = padding_for(inside, padding_fraction, min_padding) if padding is None else max(0, int(padding))
    grown = Box.from_edges(inside.x - pad, inside.y - pad, inside.right + pad, inside.bottom + pad).clamp(canvas)
    x, width = _snapped_span(grown.x, grown.width, canvas.width, multiple)
    y, height = _snapped_span(grown.y, grown.height, canvas.height, multiple)
    return Box(x, y, width, height)


def work_size(
    extent: Extent,
    target_pixels: int = TARGET_PIXELS,
    multiple: int = SNAP,
    min_side: int = MIN_WORK_SIDE,
    max_side: int = MAX_WORK_SIDE,
    *,
    upscale: bool = True,
) -> Extent:
    """The size the model runs at for an area of ``extent``: about ``target_pixels``, the aspect ratio
    kept, both sides multiples of ``multiple``.

    - ``upscale=True`` (selections): smaller areas are scaled up to the target as well; the refiner
      adds detail at its own resolution and the service scales the result back down.
    - ``upscale=False`` (whole layers): areas at most ``target_pixels`` keep their size (only snapped
      to ``multiple``), larger ones are scaled down to the target.
    - In both cases the short side is raised to ``min_side`` and then the long side capped at
      ``max_side``; for very elongated areas the cap wins, so the work area never exceeds about
      ``max(target_pixels, min_side * max_side)`` pixels.
    """
    if extent.is_empty:
        raise ValueError(f"cannot compute a work size for an empty {extent} area")
    if min_side > max_side:
        raise ValueError(f"min_side {min_side} is larger than max_side {max_side}")
    scale = math.sqrt(target_pixels / extent.pixel_count)
    if not upscale:
        scale = min(scale, 1.0)
    scale = max(scale, min_side / extent.shortest_side)
    scale = min(scale, max_side / extent.longest_side)
    width = min(snap_nearest(extent.width * scale, multiple), max(multiple, max_side - max_side % multiple))
    height = min(snap_nearest(extent.height * scale, multiple), max(multiple, max_side - max_side % multiple))
    return Extent(width, height)


def feather_radius(selection: Box | Extent, strength: float, fraction: float = FEATHER_FRACTION) -> float:
    """The inward feather radius in document pixels: ``fraction`` of the selection's diagonal, scaled by
    ``strength`` (a light refine changes little, so it needs a narrower blend), capped at a quarter of
    the selection's short side so the middle of a narrow selection is still applied in full."""
    extent = selection.extent if isinstance(selection, Box) else selection
    if extent.is_empty or strength <= 0 or fraction <= 0:
        return 0.0
    radius = fraction * extent.diagonal * min(float(strength), 1.0)
    return min(radius, extent.shortest_side / 4)


__all__ = [
    "FEATHER_FRACTION",
    "MAX_WORK_SIDE",
    "MIN_PADDING",
    "MIN_WORK_SIDE",
    "PADDING_FRACTION",
    "SNAP",
    "TARGET_PIXELS",
    "Box",
    "Extent",
    "crop_for_selection",
    "feather_radius",
    "padding_for",
    "snap_nearest",
    "snap_up",
    "work_size",
]
