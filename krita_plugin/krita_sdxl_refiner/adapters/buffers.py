"""Pixel buffers between ZeroMQ frames and Qt: one copy, no per-pixel Python."""

from __future__ import annotations

from typing import Any

from PyQt5.QtCore import QByteArray
from PyQt5.QtGui import QImage

from krita_sdxl.protocol import ImageSpec


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


def rgba_image(width: int, height: int, rgba: bytes) -> QImage:
    """A QImage (owning its pixels) of 8-bit RGBA bytes, e.g. a results thumbnail."""
    return QImage(rgba, width, height, width * 4, QImage.Format_RGBA8888).copy()


class QtPictures:
    """The workflow's ``core.host.Pictures``: QImages for the docker."""

    def preview(self, spec: ImageSpec, data: Any) -> QImage | None:
        return preview_image(spec, data)

    def thumbnail(self, width: int, height: int, rgba: bytes) -> QImage:
        return rgba_image(width, height, rgba)
