"""Krita colour spaces to wire pixel formats. No pixel is converted in Krita: the service does that.

Channel order in memory, checked in Krita 5.1.5 with ``Node.channels()`` (name, byte position):
RGBA/U8 and RGBA/U16 are Blue, Green, Red, Alpha; RGBA/F16 and RGBA/F32 are Red, Green, Blue, Alpha.
Krita's default profile for U16, F16 and F32 documents is linear (``sRGB-elle-V2-g10.icc``); for U8
it is sRGB (``sRGB-elle-V2-srgbtrc.icc``). :func:`transfer_of` reads that from the profile name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from krita_sdxl.protocol import ImageSpec


class UnsupportedFormat(Exception):
    """The document cannot be refined; the message says why, in words for the artist."""


@dataclass(frozen=True)
class PixelFormat:
    color_model: str  # Krita's id, e.g. "RGBA"
    color_depth: str  # Krita's id: "U8", "U16", "F16", "F32"
    order: str  # wire channel order
    depth: int  # bits per channel
    sample: str  # "uint" or "float"

    def spec(self, width: int, height: int) -> ImageSpec:
        return ImageSpec(width, height, self.order, self.depth, self.sample)

    @property
    def bytes_per_pixel(self) -> int:
        return 4 * self.depth // 8

    @property
    def label(self) -> str:
        names = {"U8": "8-bit integer", "U16": "16-bit integer", "F16": "16-bit float", "F32": "32-bit float"}
        return f"RGB/Alpha {names.get(self.color_depth, self.color_depth)}"


_FORMATS = {
    "U8": ("BGRA", 8, "uint"),
    "U16": ("BGRA", 16, "uint"),
    "F16": ("RGBA", 16, "float"),
    "F32": ("RGBA", 32, "float"),
}

_MODEL_NAMES = {
    "CMYKA": "CMYK",
    "LABA": "L*a*b*",
    "GRAYA": "greyscale",
    "XYZA": "XYZ",
    "YCbCrA": "YCbCr",
}


def pixel_format(color_model: str, color_depth: str) -> PixelFormat:
    """The wire format for a Krita colour model and depth; raises :class:`UnsupportedFormat`."""
    if color_model != "RGBA":
        name = _MODEL_NAMES.get(color_model, color_model or "unknown")
        raise UnsupportedFormat(
            f"This document uses the {name} colour model. The refiner works on RGB images only: "
            "convert the image or layer to RGB/Alpha (Image > Convert Image Color Space). Nothing was sent."
        )
    if color_depth not in _FORMATS:
        raise UnsupportedFormat(
            f"Colour depth {color_depth or 'unknown'} is not supported; use 8 or 16-bit integer, "
            "or 16 or 32-bit float. Nothing was sent."
        )
    order, depth, sample = _FORMATS[color_depth]
    return PixelFormat(color_model, color_depth, order, depth, sample)


def transfer_of(profile_name: str) -> str:
    """``"linear"`` for linear-light profiles (Krita's ``…-g10.icc``, names with "linear"), else ``"srgb"``."""
    name = profile_name.lower()
    if "g10" in name or "linear" in name or "scrgb" in name:
        return "linear"
    return "srgb"


_NONZERO = bytes([0] + [1] * 255)  # bytes.translate table: 0 stays 0, anything else becomes 1


SAMPLE_STRIDE = 61  # pixels: a prime, so that a regular pattern does not hide from the sample


def _sample_visible(view: memoryview, first: int, size: int, step: int, mask: Any | None) -> bool:
    """Whether every ``SAMPLE_STRIDE``-th pixel shows something (a quick yes; no is not an answer)."""
    alpha = 0
    for k in range(size):
        alpha |= int.from_bytes(bytes(view[first + k :: step * SAMPLE_STRIDE]).translate(_NONZERO), "little")
    if mask is not None:
        alpha &= int.from_bytes(bytes(memoryview(mask).cast("B")[::SAMPLE_STRIDE]).translate(_NONZERO), "little")
    return alpha != 0


CHUNK_PIXELS = 1 << 18  # any_visible looks at this many pixels at a time (1 MiB of 8-bit RGBA)


def any_visible(fmt: PixelFormat, pixels: Any, mask: Any | None = None) -> bool:
    """Whether any pixel of ``pixels`` (``fmt``) has a non-zero alpha where ``mask`` (L8, same
    size; None = everywhere) is non-zero. Without numpy: a quick yes from every ``SAMPLE_STRIDE``-th
    pixel first (no copy); then ``CHUNK_PIXELS`` at a time, stopping at the first visible one, so that no
    step holds Python's lock for long when it runs off the UI thread (a 6000x4000 layer: a few
    milliseconds a step). Each alpha byte plane is compared with zeros (no mask: a memcmp, about 1 ms a
    megapixel, as live refine runs it often), or it and the mask become one big integer of 0/1 bytes,
    ANDed in C."""
    view = memoryview(pixels).cast("B")
    marks = memoryview(mask).cast("B") if mask is not None else None
    step = fmt.bytes_per_pixel
    size = fmt.depth // 8
    first = fmt.order.index("A") * size
    if _sample_visible(view, first, size, step, mask):
        return True  # most pictures: seen in every 61st pixel, without copying the rest
    count = view.nbytes // step
    for start in range(0, count, CHUNK_PIXELS):
        end = min(count, start + CHUNK_PIXELS)
        data = bytes(view[start * step : end * step])
        planes = [data[first + k :: step] for k in range(size)]
        if marks is None:
            zero = bytes(end - start)
            if any(plane != zero for plane in planes):
                return True
            continue
        alpha = 0
        for plane in planes:
            alpha |= int.from_bytes(plane.translate(_NONZERO), "little")
        alpha &= int.from_bytes(bytes(marks[start:end]).translate(_NONZERO), "little")
        if alpha:
            return True
    return False
