"""Pixel conversions between protocol images and float arrays, masks, feathering, resizing, padding.

numpy (and Pillow for resampling) only, pure functions, vectorised: a 4096x4096 image converts in
a fraction of a second. Float arrays are float32, HxWx3 RGB (or HxW) in [0, 1].

Output rule (``merge_result``): the result has exactly the input's size, channel order and sample
format. Without a mask the input's alpha samples are copied verbatim. With a mask (already
feathered), an input with alpha gets ``alpha = original alpha x mask`` (exactly 0 where the mask is
0, the original samples where it is 1); an input without alpha gets its colour blended between the
original and the result by the mask (the original samples verbatim where the mask is 0).
"""

from __future__ import annotations

import numpy as np
from PIL import Image as PILImage

from krita_sdxl.protocol import Image, ImageSpec

_NUMPY_DTYPES = {("uint", 8): "<u1", ("uint", 16): "<u2", ("float", 16): "<f2", ("float", 32): "<f4"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, for "L" images
MAX_BOX_RADIUS = 4096  # keeps the exact integer box sums of feather_inward inside int64


def numpy_dtype(spec: ImageSpec) -> np.dtype:
    try:
        return np.dtype(_NUMPY_DTYPES[(spec.sample, spec.depth)])
    except KeyError:
        raise ValueError(f"unsupported sample format: {spec.depth}-bit {spec.sample}") from None


def samples(img: Image) -> np.ndarray:
    """The image's samples as a read-only HxWxC array in their own dtype (no copy)."""
    spec = img.spec
    flat = np.frombuffer(img.data, dtype=numpy_dtype(spec), count=spec.width * spec.height * spec.channels)
    return flat.reshape(spec.height, spec.width, spec.channels)


def _color_index(order: str) -> list[int]:
    return [0] if order == "L" else [order.index(c) for c in "RGB"]


def _to_float(values: np.ndarray, spec: ImageSpec, clip: bool = True) -> np.ndarray:
    if spec.sample == "uint":
        scale = np.float32(1.0 / (2**spec.depth - 1))
        return np.multiply(values, scale, dtype=np.float32)
    out = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0, out=out) if clip else out


def _quantize(values: np.ndarray, spec: ImageSpec) -> np.ndarray:
    dtype = numpy_dtype(spec)
    if spec.sample == "float":
        return values.astype(dtype)
    top = float(2**spec.depth - 1)
    scaled = np.multiply(values, np.float32(top), dtype=np.float32)
    np.clip(scaled, 0.0, top, out=scaled)
    scaled += np.float32(0.5)
    return scaled.astype(dtype)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return (rgb @ _LUMA)[..., None]


def to_rgb_alpha(img: Image) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB float32 HxWx3 in [0, 1], alpha float32 HxW or None). Float samples are clipped to [0, 1]
    (NaN becomes 0) because that is what the model takes; "L" images become grey RGB."""
    spec = img.spec
    raw = samples(img)
    color = raw[..., _color_index(spec.order)]
    rgb = _to_float(color, spec)
    if spec.order == "L":
        rgb = np.repeat(rgb, 3, axis=2)
    alpha = _to_float(raw[..., spec.order.index("A")], spec) if spec.has_alpha else None
    return rgb, alpha


def from_rgb_alpha(rgb: np.ndarray, alpha: np.ndarray | None, spec: ImageSpec) -> bytes:
    """Pack float RGB (and alpha; None = opaque) into ``spec``'s layout and sample format."""
    out = np.empty((spec.height, spec.width, spec.channels), dtype=numpy_dtype(spec))
    _put_color(out, rgb, spec)
    if spec.has_alpha:
        a = np.ones(rgb.shape[:2], np.float32) if alpha is None else alpha
        out[..., spec.order.index("A")] = _quantize(a, spec)
    return out.tobytes()


def _put_color(out: np.ndarray, rgb: np.ndarray, spec: ImageSpec) -> None:
    if rgb.shape[:2] != out.shape[:2]:
        raise ValueError(f"pixels are {rgb.shape[1]}x{rgb.shape[0]}, the image is {spec.width}x{spec.height}")
    color = _luma(rgb) if spec.order == "L" else rgb
    out[..., _color_index(spec.order)] = _quantize(color, spec)


def merge_result(rgb: np.ndarray, original: Image, mask: np.ndarray | None = None) -> bytes:
    """The result image in ``original``'s exact format, following the module's output rule.
    ``mask``: HxW float32 in [0, 1] (feathered already), or None."""
    spec = original.spec
    raw = samples(original)
    out = np.empty_like(raw)
    if spec.has_alpha:
        _put_color(out, rgb, spec)
        a = spec.order.index("A")
        if mask is None:
            out[..., a] = raw[..., a]
        else:
            scaled = _quantize(_to_float(raw[..., a], spec, clip=False) * mask, spec)
            out[..., a] = np.where(mask >= 1.0, raw[..., a], scaled)
        return out.tobytes()
    if mask is None:
        _put_color(out, rgb, spec)
        return out.tobytes()
    idx = _color_index(spec.order)
    old = _to_float(raw[..., idx], spec, clip=False)
    new = _luma(rgb) if spec.order == "L" else rgb
    m = mask[..., None]
    blended = _quantize(old + m * (new - old), spec)
    out[..., idx] = np.where(m > 0.0, blended, raw[..., idx])
    return out.tobytes()


def mask_to_float(img: Image) -> np.ndarray:
    """An "L" mask image as float32 HxW in [0, 1]."""
    if img.spec.order != "L":
        raise ValueError(f"a mask must be a one-channel L image, got {img.spec.order}")
    return _to_float(samples(img)[..., 0], img.spec)


def _box_sum(values: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Sum over a window of 2r+1 samples along ``axis``, the edge samples repeated beyond the border."""
    pad = [(0, 0)] * values.ndim
    pad[axis] = (r + 1, r)  # one extra leading sample becomes the zero of the running sum
    padded = np.pad(values, pad, mode="edge")
    padded.swapaxes(0, axis)[0] = 0
    total = np.cumsum(padded, axis=axis)
    n = values.shape[axis]
    hi: list[slice] = [slice(None)] * values.ndim
    lo: list[slice] = [slice(None)] * values.ndim
    hi[axis] = slice(2 * r + 1, 2 * r + 1 + n)
    lo[axis] = slice(0, n)
    return total[tuple(hi)] - total[tuple(lo)]


def feather_inward(mask: np.ndarray, radius: float) -> np.ndarray:
    """Soften a mask's edges inward only.

    The mask is blurred by a box filter of width 2r+1 (r = radius/2) applied twice per axis, which
    spreads a hard edge over ``2r ~ radius`` pixels on either side with a smooth, piecewise
    quadratic ramp; ``clip(2*blur - 1, 0, 1)`` keeps only the inner half of that ramp (0 on the
    edge, 1 from ``radius`` pixels inside), and multiplying by the mask keeps it exactly 0 wherever
    the mask is 0. The image border is not an edge (the mask is extended past it). The blur runs on
    integer sums of the mask quantised to 1/255, so "fully inside" comes out as exactly 1.0.
    """
    mask = np.asarray(mask, dtype=np.float32)
    if radius < 1.0:
        return mask.copy()
    r = min(max(1, int(radius / 2 + 0.5)), MAX_BOX_RADIUS)
    q = np.rint(mask * 255.0).astype(np.int64)
    for axis in (0, 0, 1, 1):
        q = _box_sum(q, r, axis)
    blurred = q.astype(np.float64) / (255.0 * float(2 * r + 1) ** 4)
    ramp = np.clip(2.0 * blurred - 1.0, 0.0, 1.0).astype(np.float32)
    return ramp * mask


def resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample an HxWxC or HxW float array in [0, 1] to ``size`` = (width, height), Lanczos
    (antialiased when shrinking), clipped back to [0, 1]."""
    width, height = size
    if values.shape[1] == width and values.shape[0] == height:
        return values
    planes = values[..., None] if values.ndim == 2 else values
    out = np.empty((height, width, planes.shape[2]), dtype=np.float32)
    for c in range(planes.shape[2]):
        plane = PILImage.fromarray(np.ascontiguousarray(planes[..., c], dtype=np.float32))
        out[..., c] = np.asarray(plane.resize((width, height), PILImage.Resampling.LANCZOS))
    np.clip(out, 0.0, 1.0, out=out)
    return out[..., 0] if values.ndim == 2 else out


def pad_to_multiple(values: np.ndarray, multiple: int = 8) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad the bottom and right edges by mirroring to a multiple of ``multiple`` pixels. Returns the
    padded array and the original (height, width): ``padded[:h, :w]`` undoes it."""
    h, w = values.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return values, (h, w)
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (values.ndim - 2)
    return np.pad(values, pad, mode="symmetric"), (h, w)
