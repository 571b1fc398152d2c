"""Large images refined at native resolution in overlapping, smoothly blended tiles.

When the image the model would run on (the job's work size, or the image's own size when it has
none) has more than ``TilingConfig.threshold`` pixels, :func:`refine_if_large` cuts it into
overlapping tiles of ``TilingConfig.tile`` pixels a side (the model's comfortable size: about
1024 for SDXL), refines every tile through the engine's own ``refine`` (so every per-image path of
the engine applies to each tile), and blends the tiles back with cosine ramps across the overlaps.
A job that asked for a work size at or below the threshold (the plugin's whole-layer plan asks for
about one megapixel) is not tiled: it runs scaled, as it asked.

Decisions:

- **Tile layout** (:func:`plan_tiles`): a grid; along each axis every tile is ``tile`` long (a
  multiple of 8) and the tiles are spread evenly from one border to the other, so the last tile
  shifts inward instead of shrinking and every overlap is at least ``overlap``. An axis no longer
  than one tile gets a single tile of the axis' length (the engine pads it to a multiple of 8).
  Equal tile sizes also mean one tensor shape for the whole job (good for compiled UNets).
- **Blending** (:func:`blend_weights`): each tile's raw weight is 1 inside, falling with a cosine
  ramp to 0 over the overlap towards every edge it shares with another tile (never at the image
  border), then normalised by the sum over all tiles, so the weights sum to 1 at every pixel: an
  image refined by an identity function comes back unchanged.
- **Masks**: each tile is refined with its part of the mask (so masked refine keeps what lies
  outside it, as for a whole image); tiles entirely outside the mask are skipped.
- **Seed**: every tile uses the job's seed (the common choice in tiled upscalers); results stay
  reproducible for a given seed, tile size and overlap.
- **Progress**: ``total`` is tiles x denoising steps and ``step`` runs from 1 to total over all
  tiles; previews show the tile being refined. Cancel is checked at every step as usual.

Planning and blending are pure numpy functions; the engine hook is :func:`refine_if_large`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

import numpy as np

from krita_sdxl.protocol import Image, ImageSpec
from krita_sdxl.protocol.geometry import Box

from . import pixels, work_image
from .request import JobCancelled, ProgressFn, RefineRequest, StopFn

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 2048 * 2048  # pixels; larger images are tiled
DEFAULT_TILE = 1024  # px a side: SDXL's native resolution
DEFAULT_OVERLAP = 128  # px shared by neighbouring tiles, blended
TILE_MULTIPLE = 8  # the VAE's scale factor


@dataclass(frozen=True)
class TilingConfig:
    """When and how to tile. ``threshold`` 0 turns tiling off."""

    threshold: int = DEFAULT_THRESHOLD
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    multiple: int = TILE_MULTIPLE

    def __post_init__(self) -> None:
        if self.multiple < 1:
            raise ValueError(f"the tile multiple must be at least 1, got {self.multiple}")
        if self.tile < self.multiple or self.tile % self.multiple:
            raise ValueError(f"the tile size must be a positive multiple of {self.multiple}, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"the tile overlap must be from 0 to below the tile size {self.tile}, got {self.overlap}")
        if self.threshold < 0:
            raise ValueError(f"the tile threshold must be 0 (off) or a pixel count, got {self.threshold}")
        if 0 < self.threshold < self.tile * self.tile:
            raise ValueError(
                f"the tile threshold ({self.threshold} px) must be at least one tile "
                f"({self.tile}x{self.tile} = {self.tile * self.tile} px), or 0 to turn tiling off"
            )

    def applies(self, width: int, height: int) -> bool:
        """Whether an image of this size is refined in tiles."""
        return self.threshold > 0 and width * height > self.threshold


# --- planning ------------------------------------------------------------------------------------


def plan_axis(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, size) of the tiles along one axis of ``length`` pixels: one tile when it fits, else
    the fewest ``tile``-long tiles that overlap by at least ``overlap``, spread evenly so that the
    first starts at 0 and the last ends at ``length``."""
    if length < 1:
        raise ValueError(f"cannot tile an empty axis ({length} px)")
    if not 0 <= overlap < tile:
        raise ValueError(f"the overlap must be at least 0 and below the tile size {tile}, got {overlap}")
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))  # >= 2 since length > tile
    span = length - tile
    # Steps of floor or ceil(span / (count - 1)) <= tile - overlap: every overlap is >= overlap.
    return [(i * span // (count - 1), tile) for i in range(count)]


def plan_tiles(width: int, height: int, tile: int, overlap: int, multiple: int = TILE_MULTIPLE) -> list[Box]:
    """Tiles covering a ``width`` x ``height`` image with no gaps, row by row, all inside the image.

    Sides are ``tile`` long (which must be a multiple of ``multiple``) wherever the image is at
    least that long; a shorter image side is covered by one tile of its own length."""
    if tile < multiple or tile % multiple:
        raise ValueError(f"the tile size must be a positive multiple of {multiple}, got {tile}")
    xs = plan_axis(width, tile, overlap)
    ys = plan_axis(height, tile, overlap)
    return [Box(x, y, w, h) for y, h in ys for x, w in xs]


# --- blending ------------------------------------------------------------------------------------


def _axis_ramps(plan: Sequence[Box]) -> tuple[float, float]:
    """Ramp length per axis (x, y): the smallest overlap between neighbouring spans, at least 1."""

    def ramp(spans: set[tuple[int, int]]) -> float:
        ordered = sorted(spans)
        overlaps = [a + n - b for (a, n), (b, _) in pairwise(ordered) if a + n > b]
        return float(max(1, min(overlaps, default=1)))

    return ramp({(b.x, b.width) for b in plan}), ramp({(b.y, b.height) for b in plan})


def _ramp(start: int, size: int, length: int, ramp: float, lo: int, hi: int) -> np.ndarray:
    """Raw 1D weight of the span [start, start + size) at the pixels [lo, hi) of an axis of
    ``length``: 0 outside the span, rising with a cosine over ``ramp`` pixels from each edge that is
    not the image border, positive at every pixel inside the span."""
    centre = np.arange(lo, hi, dtype=np.float64) + 0.5
    t = np.ones_like(centre)
    if start > 0:
        np.minimum(t, (centre - start) / ramp, out=t)
    if start + size < length:
        np.minimum(t, (start + size - centre) / ramp, out=t)
    np.clip(t, 0.0, 1.0, out=t)
    weight = 0.5 - 0.5 * np.cos(np.pi * t)
    weight[(centre < start) | (centre > start + size)] = 0.0
    return weight


def _raw(box: Box, region: Box, size: tuple[int, int], ramps: tuple[float, float]) -> np.ndarray:
    """The raw weight of ``box`` over ``region`` (height x width, float64)."""
    wx = _ramp(box.x, box.width, size[0], ramps[0], region.x, region.right)
    wy = _ramp(box.y, box.height, size[1], ramps[1], region.y, region.bottom)
    return np.outer(wy, wx)


class TileWeights:
    """The blend weights of every tile of a plan (see :func:`blend_weights`), computed once.

    Each tile's raw weight is the product of a ramp along x and one along y. For a grid plan (what
    :func:`plan_tiles` makes) the sum over all tiles is the product of the per-axis sums, so the
    weights are normalised per axis in O(image side) work; any other plan is normalised per pixel
    over the tiles that overlap the one asked for."""

    def __init__(self, plan: Sequence[Box]) -> None:
        self.plan = list(plan)
        if not self.plan:
            raise ValueError("the plan has no tiles")
        self._members = set(self.plan)
        self.size = (max(b.right for b in self.plan), max(b.bottom for b in self.plan))
        self.ramps = _axis_ramps(self.plan)
        xs = sorted({(b.x, b.width) for b in self.plan})
        ys = sorted({(b.y, b.height) for b in self.plan})
        self._axes: tuple[dict[tuple[int, int], np.ndarray], ...] | None = None
        if len(self._members) == len(self.plan) == len(xs) * len(ys):  # every (x span, y span) pair
            self._axes = (
                self._normalised(xs, self.size[0], self.ramps[0]),
                self._normalised(ys, self.size[1], self.ramps[1]),
            )

    @staticmethod
    def _normalised(spans: list[tuple[int, int]], length: int, ramp: float) -> dict[tuple[int, int], np.ndarray]:
        raw = {(a, n): _ramp(a, n, length, ramp, a, a + n) for a, n in spans}
        total = np.zeros(length, np.float64)
        for (a, n), weight in raw.items():
            total[a : a + n] += weight
        return {(a, n): weight / total[a : a + n] for (a, n), weight in raw.items()}

    def __call__(self, tile: Box) -> np.ndarray:
        """The weights of ``tile`` (tile.height x tile.width, float32)."""
        if tile not in self._members:
            raise ValueError(f"the tile {tile} is not part of the plan")
        if self._axes is not None:
            wx, wy = self._axes[0][(tile.x, tile.width)], self._axes[1][(tile.y, tile.height)]
            return np.outer(wy, wx).astype(np.float32)
        own = _raw(tile, tile, self.size, self.ramps)
        total = np.zeros_like(own)
        for other in self.plan:
            shared = other.intersect(tile)
            if shared.is_empty:
                continue
            local = shared.relative_to(tile)
            total[local.y : local.bottom, local.x : local.right] += _raw(other, shared, self.size, self.ramps)
        return (own / total).astype(np.float32)


def blend_weights(tile: Box, plan: Sequence[Box]) -> np.ndarray:
    """The weights (tile.height x tile.width, float32) with which ``tile``'s result goes into the
    image covered by ``plan``: smooth ramps across the overlaps, normalised so that the weights of
    all tiles of the plan sum to 1 at every pixel. For many tiles use one :class:`TileWeights`."""
    return TileWeights(plan)(tile)


# tile_fn(index, box, pixels of the box) -> the processed pixels, same shape
TileFn = Callable[[int, Box, np.ndarray], np.ndarray]


def map_tiles(values: np.ndarray, plan: Sequence[Box], fn: TileFn) -> np.ndarray:
    """Apply ``fn`` to every tile of ``values`` (H x W or H x W x C) and blend the results with
    :func:`blend_weights` into a new float32 array of the same shape (accumulate, weights already
    normalised). With an identity ``fn`` this returns ``values`` within float rounding."""
    weights = TileWeights(plan)
    out = np.zeros(values.shape, dtype=np.float32)
    for index, box in enumerate(plan):
        region = (slice(box.y, box.bottom), slice(box.x, box.right))
        part = np.asarray(fn(index, box, values[region]), dtype=np.float32)
        if part.shape != values[region].shape:
            raise ValueError(f"tile {index} came back as {part.shape}, expected {values[region].shape}")
        weight = weights(box)
        if part.ndim == 3:
            weight = weight[..., None]
        out[region] += part * weight
    return out


# --- the engine hook -----------------------------------------------------------------------------


def run_size(req: RefineRequest) -> tuple[int, int]:
    """(width, height) the model would run at: the work size, or the image's own size."""
    spec = req.image.spec
    return req.work_size or (spec.width, spec.height)


def refine_if_large(engine: Any, req: RefineRequest, on_progress: ProgressFn, should_stop: StopFn) -> Image | None:
    """The engine hook: refine ``req`` in tiles if it is large (per ``engine.tiling``, a
    :class:`TilingConfig`; absent or None = the defaults), and return the result; None when the job
    is not tiled and the engine should run it whole."""
    config = getattr(engine, "tiling", None) or TilingConfig()
    if getattr(req, "mode", "refine") != "refine" or getattr(req, "image", None) is None:
        return None
    if not config.applies(*run_size(req)):
        return None
    watermark = getattr(engine, "watermark", None)
    return refine_in_tiles(engine.refine, req, config, on_progress, should_stop, watermark=watermark)


def _float_image(values: np.ndarray) -> Image:
    """A float32 protocol image of an H x W x 3 array (RGBA, opaque: a mask then only touches the
    alpha, which is dropped, so the colour is the engine's own) or of an H x W mask (L). Float
    samples pass through ``refine`` losslessly."""
    height, width = values.shape[:2]
    if values.ndim == 2:
        data = np.ascontiguousarray(values, dtype="<f4")
        return Image(ImageSpec(width, height, "L", 32, "float"), data.tobytes())
    rgba = np.ones((height, width, 4), dtype="<f4")
    rgba[..., :3] = values
    return Image(ImageSpec(width, height, "RGBA", 32, "float"), rgba.tobytes())


def refine_in_tiles(
    refine: Callable[[RefineRequest, ProgressFn, StopFn], Image],
    req: RefineRequest,
    config: TilingConfig,
    on_progress: ProgressFn,
    should_stop: StopFn,
    watermark: Any = None,
) -> Image:
    """Refine ``req`` tile by tile with ``refine`` (an engine's own, run whole on each tile) and
    return an image of the input's exact size and format, following ``Engine.refine``'s output
    rule (alpha untouched, or multiplied by the feathered mask). The picture goes in and out by
    the engine's colour path (backend/engine/work_image.py); ``watermark`` (with an ``apply(rgb)``) marks
    the returned picture once, after the tiles are blended.

    With a mask, each tile gets its part of the mask (with ``keep_unmasked``, so the engine keeps
    what lies outside it), tiles entirely outside the mask are not refined at all (progress counts
    only the tiles that are), and the result keeps the input's own pixels wherever the mask is 0."""
    mask = pixels.image_mask(req.image, req.mask)
    if should_stop():
        raise JobCancelled()
    job = work_image.prepare(req, mask)
    rgb, run_mask = job.rgb, job.run_mask
    keep = mask is not None and getattr(req, "keep_unmasked", False)
    plan = plan_tiles(rgb.shape[1], rgb.shape[0], config.tile, config.overlap, config.multiple)
    busy = [i for i, b in enumerate(plan) if run_mask is None or run_mask[b.y : b.bottom, b.x : b.right].max() > 0]
    order = {index: n for n, index in enumerate(busy)}
    steps = req.plan.denoise_steps
    total = len(busy) * steps
    log.info(
        "refining %dx%d in %d of %d tiles of up to %d px (overlap %d), %d steps in all",
        rgb.shape[1],
        rgb.shape[0],
        len(busy),
        len(plan),
        config.tile,
        config.overlap,
        total,
    )

    def run_tile(index: int, box: Box, part: np.ndarray) -> np.ndarray:
        if index not in order:
            return part  # entirely outside the mask: nothing there changes
        done = order[index] * steps

        def progress(step: int, _total: int, preview: Image | None) -> None:
            on_progress(done + min(step, steps), total, preview)

        tile_mask = (
            _float_image(run_mask[box.y : box.bottom, box.x : box.right]) if keep and run_mask is not None else None
        )
        sub = replace(req, image=_float_image(part), work_size=None, mask=tile_mask, feather=0.0, transfer="srgb")
        out, _ = pixels.to_rgb_alpha(refine(sub, progress, should_stop))
        return out

    out = map_tiles(rgb, plan, run_tile)
    # the watermark goes on the blended whole, never per tile (backend/engine/work_image.py)
    return work_image.finish(job, out, watermark)


__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_THRESHOLD",
    "DEFAULT_TILE",
    "TileWeights",
    "TilingConfig",
    "blend_weights",
    "map_tiles",
    "plan_axis",
    "plan_tiles",
    "refine_if_large",
    "refine_in_tiles",
    "run_size",
]
