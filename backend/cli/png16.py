"""A 16-bit PNG writer for what Pillow cannot write: 16-bit colour and grey+alpha (stdlib zlib + numpy)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)
_IDAT_BYTES = 1 << 20


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png16(pixels: np.ndarray, icc: bytes | None = None, level: int = 6) -> bytes:
    """PNG bytes of ``pixels`` (H, W, C) uint16, C = 1 to 4; every row uses the Up filter."""
    h, w, c = pixels.shape
    rows = pixels.astype(">u2").reshape(h, w * c).view(np.uint8)
    up = rows.copy()
    up[1:] -= rows[:-1]  # Up filter: the byte minus the one above, modulo 256
    body = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1).tobytes()
    parts = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, _COLOUR_TYPES[c], 0, 0, 0))]
    if icc:
        parts.append(_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    packed = zlib.compress(body, level)
    parts += [_chunk(b"IDAT", packed[i : i + _IDAT_BYTES]) for i in range(0, len(packed), _IDAT_BYTES)]
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)
