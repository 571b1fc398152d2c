"""Small 8-bit RGBA thumbnails from raw layer pixels, without numpy and without per-pixel Python
for integer formats (byte slicing and ``bytes.translate`` do the work in C).

Input layouts (see :mod:`pixelformat`): 8 and 16-bit integer BGRA (little endian), 16 and 32-bit
float RGBA. Linear-light pixels (``transfer="linear"``) are encoded to sRGB for display. Sampling is
nearest-neighbour; the view smooths the result when it scales it.
"""

from __future__ import annotations

import struct
from typing import Any

from .pixelformat import PixelFormat


def _srgb_encode(v: float) -> float:
    if v <= 0.0031308:
        return 12.92 * max(v, 0.0)
    return 1.055 * min(v, 1.0) ** (1 / 2.4) - 0.055


_LINEAR_TO_SRGB8 = bytes(round(255 * _srgb_encode(i / 255)) for i in range(256))
_FLOAT_LUT_SIZE = 4096
_LINEAR_FLOAT_LUT = [round(255 * _srgb_encode(i / (_FLOAT_LUT_SIZE - 1))) for i in range(_FLOAT_LUT_SIZE)]
_SRGB_FLOAT_LUT = [round(255 * i / (_FLOAT_LUT_SIZE - 1)) for i in range(_FLOAT_LUT_SIZE)]


def thumbnail_size(width: int, height: int, side: int) -> tuple[int, int]:
    """The size a ``width`` x ``height`` image is shown at, its longer side at most ``side``."""
    if width <= 0 or height <= 0:
        return 0, 0
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _samples(size: int, count: int) -> tuple[int, int]:
    """First index and step of ``count`` evenly spaced samples over ``size`` (centred)."""
    step = max(1, size // count)
    return max(0, (size - step * (count - 1) - 1) // 2), step


def _gather(row: memoryview, start: int, step: int, count: int, bpp: int) -> bytearray:
    """``count`` pixels of one row, every ``step``-th from ``start``, packed (C-speed slicing)."""
    out = bytearray(count * bpp)
    first, stride = start * bpp, step * bpp
    for k in range(bpp):
        out[k::bpp] = row[first + k : first + k + stride * (count - 1) + 1 : stride]
    return out


def _to_rgba8(fmt: PixelFormat, linear: bool, packed: bytes) -> bytes:
    """Packed pixels of ``fmt`` to RGBA8."""
    if fmt.sample == "uint":
        packed = bytes(packed)
        if fmt.depth == 16:
            packed = packed[1::2]  # the high byte of each little-endian 16-bit sample
        b, g, r, a = packed[0::4], packed[1::4], packed[2::4], packed[3::4]
        if linear:
            r, g, b = (c.translate(_LINEAR_TO_SRGB8) for c in (r, g, b))
        out = bytearray(len(packed))
        out[0::4], out[1::4], out[2::4], out[3::4] = r, g, b, a
        return bytes(out)
    code = "e" if fmt.depth == 16 else "f"
    values = struct.unpack(f"<{len(packed) // (fmt.depth // 8)}{code}", bytes(packed))
    lut = _LINEAR_FLOAT_LUT if linear else _SRGB_FLOAT_LUT
    top = _FLOAT_LUT_SIZE - 1
    out = bytearray(len(values))
    for channel in range(3):
        out[channel::4] = bytes(lut[min(top, max(0, int(v * top + 0.5)))] for v in values[channel::4])
    out[3::4] = bytes(min(255, max(0, int(v * 255 + 0.5))) for v in values[3::4])
    return bytes(out)


def rgba8_thumbnail(
    fmt: PixelFormat, transfer: str, width: int, height: int, data: Any, side: int
) -> tuple[int, int, bytes]:
    """``(w, h, RGBA8 bytes)``: ``data`` (``fmt``, ``width`` x ``height``) sampled down to at most ``side``."""
    tw, th = thumbnail_size(width, height, side)
    if tw == 0:
        return 0, 0, b""
    bpp = fmt.bytes_per_pixel
    view = memoryview(data).cast("B")
    if view.nbytes != width * height * bpp:
        raise ValueError(f"{view.nbytes} bytes for {width}x{height} {fmt.label}, expected {width * height * bpp}")
    x0, dx = _samples(width, tw)
    y0, dy = _samples(height, th)
    stride = width * bpp
    packed = b"".join(
        _gather(view[r * stride : (r + 1) * stride], x0, dx, tw, bpp) for r in range(y0, y0 + dy * th, dy)
    )
    return tw, th, _to_rgba8(fmt, transfer == "linear", packed)
