"""Colour under fully transparent pixels, filled from the visible neighbourhood before the model sees it.

A layer's fully transparent pixels still carry a colour (usually black, or whatever was erased). The
artist never sees it, but the model does: resizing to the work size and the VAE (one latent per 8x8
pixels) mix it into the visible pixels along a shape's edge, so a character cut out on a transparent
layer comes back with a dark fringe. :func:`fill_transparent` replaces that colour by one spread from
the visible pixels around it (a push-pull pyramid: coarser and coarser alpha-weighted averages are
pulled up, then pushed back down into the holes, smoothly upsampled), so the pixels next to an edge
get the edge's own colour and far-away holes a smooth blend of what surrounds them.

Only pixels with alpha exactly 0 change; every pixel with some coverage keeps its own colour. Alpha
itself is not touched (the result's alpha follows the output rule in :mod:`.pixels`).
"""

from __future__ import annotations

import numpy as np


def _pull(colour: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One level coarser: 2x2 sums of premultiplied colour and of weight (odd sides padded with 0)."""
    h, w = weight.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        colour = np.pad(colour, ((0, ph), (0, pw), (0, 0)))
        weight = np.pad(weight, ((0, ph), (0, pw)))
    c = colour[0::2, 0::2] + colour[1::2, 0::2] + colour[0::2, 1::2] + colour[1::2, 1::2]
    s = weight[0::2, 0::2] + weight[1::2, 0::2] + weight[0::2, 1::2] + weight[1::2, 1::2]
    return c, s


def _upsample_axis(values: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Double ``values`` along ``axis`` by linear interpolation between sample centres (edges
    clamped), then crop to ``length``."""
    v = np.moveaxis(values, axis, 0)
    before = np.concatenate([v[:1], v[:-1]])
    after = np.concatenate([v[1:], v[-1:]])
    out = np.empty((2 * v.shape[0], *v.shape[1:]), dtype=v.dtype)
    out[0::2] = 0.75 * v + 0.25 * before
    out[1::2] = 0.75 * v + 0.25 * after
    return np.moveaxis(out[:length], 0, axis)


def _upsample(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return _upsample_axis(_upsample_axis(values, 0, shape[0]), 1, shape[1])


def fill_transparent(rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """``rgb`` (HxWx3 float) with the colour of every pixel whose ``alpha`` (HxW in [0, 1]) is 0
    replaced from its visible neighbourhood. Returns ``rgb`` itself when nothing is transparent (or
    nothing visible)."""
    if alpha is None:
        return rgb
    hole = alpha <= 0.0
    if not hole.any() or hole.all():
        return rgb
    weight = np.clip(alpha, 0.0, 1.0).astype(np.float32)
    levels = [_pull(rgb.astype(np.float32) * weight[..., None], weight)]  # from half size up
    while max(levels[-1][1].shape) > 1:
        levels.append(_pull(*levels[-1]))
    colour, weight = levels[-1]  # the coarsest level: the alpha-weighted mean of the whole picture
    estimate = colour / np.maximum(weight, 1e-12)[..., None]
    for colour, weight in reversed(levels[:-1]):
        up = _upsample(estimate, weight.shape)
        trust = np.minimum(weight, 1.0)[..., None]  # a block with a whole pixel's worth of coverage is its own
        estimate = trust * (colour / np.maximum(weight, 1e-12)[..., None]) + (1.0 - trust) * up
    out = rgb.astype(np.float32, copy=True)
    out[hole] = _upsample(estimate, hole.shape)[hole]
    return out
