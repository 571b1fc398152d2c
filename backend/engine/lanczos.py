"""The plain Lanczos enlargement of a picture, in its own format: what an upscale at strength 0 returns.

8-bit pictures go through Pillow's own ``Image.resize(size, LANCZOS)`` in mode RGB or RGBA (Pillow
premultiplies RGBA by alpha while it resamples, so the colour hidden under transparent pixels never
bleeds into visible ones), so the result is exactly what Pillow gives for the same picture. 16-bit
and float pictures have no multi-channel Pillow mode: each channel is resampled as a float plane
(Pillow's mode F, the same Lanczos filter), colour premultiplied by alpha as Pillow does for 8 bits;
integer samples are clipped to their range, float samples to 0 and above (values above 1 are kept).

The result is a new writable array of the picture's samples (height x width x channels, its own
dtype): the upscale job refines it in place (:mod:`.upscale`), so it is the job's only picture-sized
buffer. Peak memory while it is made: about twice that buffer (Pillow's image and its bytes).
"""

from __future__ import annotations

import numpy as np
from PIL import Image as PILImage

from krita_sdxl.protocol import Image, ImageSpec

from . import hdr, pixels

LANCZOS = PILImage.Resampling.LANCZOS


def resize_plane(
    values: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """One float32 plane (H x W) resampled to ``size`` = (width, height) with Lanczos; ``box``: the
    source region (Pillow's ``box``, in source pixels) that maps onto the result."""
    plane = PILImage.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    return np.array(plane.resize(size, LANCZOS, box=box), dtype=np.float32)  # writable


def _pillow_8bit(image: Image, size: tuple[int, int]) -> np.ndarray:
    spec = image.spec
    mode = "RGBA" if spec.has_alpha else "RGB"
    source = PILImage.frombuffer(mode, (spec.width, spec.height), image.data, "raw", spec.order, 0, 1)
    enlarged = source.resize(size, LANCZOS)
    del source
    data = enlarged.tobytes("raw", spec.order)
    del enlarged
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(size[1], size[0], spec.channels)


def _planes(image: Image, size: tuple[int, int]) -> np.ndarray:
    spec = image.spec
    raw = pixels.samples(image)
    out = np.empty((size[1], size[0], spec.channels), dtype=raw.dtype)
    alpha = enlarged_alpha = None
    if spec.has_alpha:
        index = spec.order.index("A")
        alpha = to_unit(raw[..., index], spec)
        np.clip(alpha, 0.0, 1.0, out=alpha)
        enlarged_alpha = np.clip(resize_plane(alpha, size), 0.0, 1.0)
        put(out[..., index], enlarged_alpha, spec)
    for c, channel in enumerate(spec.order):
        if channel == "A":
            continue
        values = to_unit(raw[..., c], spec)
        if alpha is not None:
            values *= alpha
        plane = resize_plane(values, size)
        if enlarged_alpha is not None:
            np.divide(plane, enlarged_alpha, out=plane, where=enlarged_alpha > 0)
            plane[enlarged_alpha <= 0] = 0.0
        put(out[..., c], plane, spec)
    return out


def to_unit(values: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Samples of one channel as float32: integers scaled to [0, 1], floats finite (NaN as 0)."""
    if spec.sample == "uint":
        return np.multiply(values, np.float32(1.0 / (2**spec.depth - 1)), dtype=np.float32)
    return hdr.sanitize(values)


def put(out: np.ndarray, values: np.ndarray, spec: ImageSpec) -> None:
    """Write float values into one channel of ``spec``'s samples: integers clipped to their range and
    rounded, floats clipped at 0 (Lanczos rings below 0 at hard edges) and kept above 1."""
    if spec.sample == "float":
        np.copyto(out, np.maximum(values, 0.0), casting="same_kind")
        return
    top = np.float32(2**spec.depth - 1)
    scaled = np.multiply(values, top, dtype=np.float32)
    np.clip(scaled, 0.0, top, out=scaled)
    scaled += np.float32(0.5)
    np.copyto(out, scaled, casting="unsafe")


def lanczos(image: Image, size: tuple[int, int]) -> np.ndarray:
    """``image`` enlarged (or resized) to ``size`` = (width, height) with Lanczos, as a new writable
    height x width x channels array of its samples (see the module's docstring)."""
    spec = image.spec
    if spec.order == "L":
        raise ValueError("an upscale needs a picture with colour channels, not a one-channel L image")
    if spec.sample == "uint" and spec.depth == 8:
        return _pillow_8bit(image, size)
    return _planes(image, size)
