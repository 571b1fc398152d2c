"""Pixel conversions between protocol images and float arrays, masks, feathering, resizing, padding.

numpy (and Pillow for resampling) only, pure functions, vectorised: a 4096x4096 image converts in
a fraction of a second. Float arrays are float32, HxWx3 RGB (or HxW) in [0, 1].

Output rule (``merge_result``): the result has exactly the input's size, channel order and sample
format. Without a mask the input's alpha samples are copied verbatim. With a mask (already
feathered), an input with alpha gets ``alpha = original alpha x mask`` (exactly 0 where the mask is
0, the original samples where it is 1); an input without alpha gets its colour blended between the
original and the result by the mask (the original samples verbatim where the mask is 0). A result
painted from noise (``opaque``: generate at strength 1, two-stage) owes nothing to the input's
pixels, so its alpha is the mask alone (opaque without one): generating into an empty layer paints.
"""

from __future__ import annotations

import numpy as np
from PIL import Image as PILImage

from krita_sdxl.protocol import Image, ImageSpec

_NUMPY_DTYPES = {("uint", 8): "<u1", ("uint", 16): "<u2", ("float", 16): "<f2", ("float", 32): "<f4"}
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, for "L" images
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


def _to_float(values: np.ndarray, spec: ImageSpec, clip: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """Samples of one or more channels as float32 in [0, 1] (float samples: clipped, NaN as 0)."""
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    if spec.sample == "uint":
        return np.multiply(values, np.float32(1.0 / (2**spec.depth - 1)), out=out)
    np.copyto(out, values)
    if clip:  # fmax/fmin drop NaN, so NaN becomes 0 and +-inf become 1 and 0
        np.fmax(out, 0.0, out=out)
        np.fmin(out, 1.0, out=out)
    return out


def _quantize(values: np.ndarray, spec: ImageSpec, out: np.ndarray) -> None:
    """Write float values into ``out`` in the spec's sample format (uint: clipped and rounded)."""
    if spec.sample == "float":
        np.copyto(out, values, casting="same_kind")
        return
    top = float(2**spec.depth - 1)
    scaled = np.multiply(values, np.float32(top), dtype=np.float32)
    np.clip(scaled, 0.0, top, out=scaled)
    scaled += np.float32(0.5)
    np.copyto(out, scaled, casting="unsafe")  # truncation after +0.5: round half up


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Grey level of float RGB; in float64 so that a grey pixel keeps its exact float32 value."""
    return (rgb @ _LUMA).astype(np.float32)


def to_rgb_alpha(img: Image, clip: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB float32 HxWx3 in [0, 1], alpha float32 HxW in [0, 1] or None); "L" images become grey
    RGB. Float colour samples are clipped to [0, 1] (NaN becomes 0), or with ``clip=False`` come as
    they are (above 1, negative, NaN: see :mod:`.hdr`)."""
    spec = img.spec
    raw = samples(img)
    rgb = np.empty((spec.height, spec.width, 3), dtype=np.float32)
    index = _color_index(spec.order)
    for c in range(3):
        _to_float(raw[..., index[min(c, len(index) - 1)]], spec, clip=clip, out=rgb[..., c])
    alpha = _to_float(raw[..., spec.order.index("A")], spec) if spec.has_alpha else None
    return rgb, alpha


def _put_color(out: np.ndarray, rgb: np.ndarray, spec: ImageSpec) -> None:
    if rgb.shape[:2] != out.shape[:2]:
        raise ValueError(f"pixels are {rgb.shape[1]}x{rgb.shape[0]}, the image is {spec.width}x{spec.height}")
    if spec.order == "L":
        _quantize(_luma(rgb), spec, out[..., 0])
        return
    for c, dst in enumerate(_color_index(spec.order)):
        _quantize(rgb[..., c], spec, out[..., dst])


def from_rgb_alpha(rgb: np.ndarray, alpha: np.ndarray | None, spec: ImageSpec) -> bytes:
    """Pack float RGB (and alpha; None = opaque) into ``spec``'s layout and sample format."""
    out = np.empty((spec.height, spec.width, spec.channels), dtype=numpy_dtype(spec))
    _put_color(out, rgb, spec)
    if spec.has_alpha:
        a = np.ones(rgb.shape[:2], np.float32) if alpha is None else alpha
        _quantize(a, spec, out[..., spec.order.index("A")])
    return out.tobytes()


def merge_result(rgb: np.ndarray, original: Image, mask: np.ndarray | None = None, opaque: bool = False) -> bytes:
    """The result image in ``original``'s exact format, following the module's output rule.
    ``mask``: HxW float32 in [0, 1] (feathered already), or None. ``opaque``: the result was
    painted from noise; its alpha is the mask's (1 without a mask), not the original's."""
    spec = original.spec
    raw = samples(original)
    out = np.empty_like(raw)
    if spec.has_alpha:
        _put_color(out, rgb, spec)
        a = spec.order.index("A")
        if opaque:
            _quantize(np.ones(raw.shape[:2], np.float32) if mask is None else mask, spec, out[..., a])
        elif mask is None:
            out[..., a] = raw[..., a]
        else:
            _quantize(_to_float(raw[..., a], spec, clip=False) * mask, spec, out[..., a])
            np.copyto(out[..., a], raw[..., a], where=mask >= 1.0)
        return out.tobytes()
    if mask is None:
        _put_color(out, rgb, spec)
        return out.tobytes()
    planes = [_luma(rgb)] if spec.order == "L" else [rgb[..., c] for c in range(3)]
    for new, dst in zip(planes, _color_index(spec.order), strict=True):
        old = _to_float(raw[..., dst], spec, clip=False)
        _quantize(old + mask * (new - old), spec, out[..., dst])
        np.copyto(out[..., dst], raw[..., dst], where=mask <= 0.0)
    return out.tobytes()


def mask_to_float(img: Image) -> np.ndarray:
    """An "L" mask image as float32 HxW in [0, 1]."""
    if img.spec.order != "L":
        raise ValueError(f"a mask must be a one-channel L image, got {img.spec.order}")
    return _to_float(samples(img)[..., 0], img.spec)


def image_mask(image: Image, mask: Image | None) -> np.ndarray | None:
    """A job's mask as float32 HxW in [0, 1] (None without one), checked against its image's size."""
    if mask is None:
        return None
    values = mask_to_float(mask)
    spec = image.spec
    if values.shape != (spec.height, spec.width):
        raise ValueError(
            f"mask is {values.shape[1]}x{values.shape[0]}, the image is {spec.width}x{spec.height}; they must match"
        )
    return values


def _running_sum(values: np.ndarray, axis: int) -> None:
    """In-place cumulative sum. Along the first axis of an image numpy's cumsum walks memory with a
    large stride and is ~30x slower than adding whole rows, so add rows one by one."""
    if axis == values.ndim - 1:
        np.cumsum(values, axis=axis, out=values)
        return
    rows = values.swapaxes(0, axis)
    for i in range(1, rows.shape[0]):
        rows[i] += rows[i - 1]


def _tent_sum(values: np.ndarray, r: int, axis: int) -> np.ndarray:
    """A box filter of width w = 2r+1 applied twice along ``axis`` (weights w-|k| for |k| <= 2r), as
    unnormalised integer sums; samples beyond the border repeat the edge sample.

    With two running sums Q: tent[i] = Q[i+2w] - 2 Q[i+w] + Q[i]. The integer running sums may wrap
    around, but the differences are exact (modular arithmetic) as long as the result fits."""
    pad = [(0, 0)] * values.ndim
    pad[axis] = (2 * r + 2, 2 * r)  # two extra leading samples become the zeros of the running sums
    q = np.pad(values, pad, mode="edge")
    q.swapaxes(0, axis)[:2] = 0
    _running_sum(q, axis)
    _running_sum(q, axis)
    n, w = values.shape[axis], 2 * r + 1

    def part(start: int) -> np.ndarray:
        index: list[slice] = [slice(None)] * values.ndim
        index[axis] = slice(start, start + n)
        return q[tuple(index)]

    out = part(2 * w) - part(w)
    out -= part(w)
    out += part(0)
    return out


def feather_inward(mask: np.ndarray, radius: float) -> np.ndarray:
    """Soften a mask's edges inward only.

    The mask is blurred by a box filter of width 2r+1 (r = radius/2) applied twice per axis, which
    spreads a hard edge over ``2r ~ radius`` pixels on either side with a smooth, piecewise
    quadratic ramp; ``clip(2*blur - 1, 0, 1)`` keeps only the inner half of that ramp (0 on the
    edge, 1 from ``radius`` pixels inside), and multiplying by the mask keeps it exactly 0 wherever
    the mask is 0. The image border is not an edge (the mask is extended past it). The blur runs on
    exact integer sums of the mask quantised to 1/255, so "fully inside" comes out as exactly 1.0.
    """
    mask = np.asarray(mask, dtype=np.float32)
    if radius < 1.0:
        return mask.copy()
    r = min(max(1, int(radius / 2 + 0.5)), MAX_BOX_RADIUS)
    scale = 255 * (2 * r + 1) ** 4  # the sum where the mask is 1 all around
    q = np.rint(mask * 255.0).astype(np.int32 if scale < 2**31 else np.int64)
    q = _tent_sum(_tent_sum(q, r, 0), r, 1)
    blurred = np.divide(q, np.float32(scale), dtype=np.float32)
    blurred *= 2.0
    blurred -= 1.0
    np.clip(blurred, 0.0, 1.0, out=blurred)
    blurred *= mask
    return blurred


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


def linear_to_srgb(values: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 encoding of linear light in [0, 1] (the model was trained on sRGB pixels)."""
    v = np.clip(values, 0.0, 1.0)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * np.power(v, 1 / 2.4) - 0.055).astype(np.float32)


def srgb_to_linear(values: np.ndarray) -> np.ndarray:
    v = np.clip(values, 0.0, 1.0)
    return np.where(v <= 0.04045, v / 12.92, np.power((v + 0.055) / 1.055, 2.4)).astype(np.float32)
