"""Pixel buffers between ZeroMQ frames and Qt: one copy, no per-pixel Python."""

from __future__ import annotations

from typing import Any

from PyQt5.QtCore import QByteArray
from PyQt5.QtGui import QImage

from krita_sdxl.protocol import ImageSpec

from .history import THUMBNAIL_SIDE
from .pixelformat import PixelFormat
from .thumbs import rgba8_thumbnail


def to_qbytearray(buffer: Any) -> QByteArray:
    """A QByteArray holding a copy of any buffer (a zmq frame's memoryview, bytes...)."""
    if isinstance(buffer, QByteArray):
        return buffer
    view = memoryview(buffer).cast("B")
    array = QByteArray(view.nbytes, "\0")
    if view.nbytes:
        memoryview(array)[:] = view
    return array


def preview_image(spec: ImageSpec, data: Any) -> QImage | None:
    """A QImage (owning its pixels) of an 8-bit RGBA or BGRA preview frame; None for other formats."""
    if spec.depth != 8 or spec.sample != "uint":
        return None
    formats = {"RGBA": QImage.Format_RGBA8888, "BGRA": QImage.Format_ARGB32}
    if spec.order not in formats:
        return None
    raw = bytes(memoryview(data).cast("B"))
    image = QImage(raw, spec.width, spec.height, spec.width * 4, formats[spec.order])
    return image.copy()  # detach from ``raw``


def thumbnail_image(
    fmt: PixelFormat, transfer: str, width: int, height: int, data: Any, side: int = THUMBNAIL_SIDE
) -> QImage:
    """A small QImage of a layer's pixels (any supported format), for the results history."""
    w, h, rgba = rgba8_thumbnail(fmt, transfer, width, height, data, side)
    return QImage(rgba, w, h, w * 4, QImage.Format_RGBA8888).copy()
