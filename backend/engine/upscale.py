"""Upscale jobs (``submit.upscale``): enlarge the picture, then refine it in tiles at the refiner's native size.

1. **Enlarge** into the result's buffer, in the picture's own format: Lanczos (:mod:`.lanczos`), or the
   service's upscaler model (:mod:`.upscaler_model`: an ESRGAN- or SwinIR-family file run in tiles,
   then Lanczos to the exact size). At ``strength`` 0 that buffer is the result.
2. **Encode in tiles**: every tile (``TilingConfig.tile`` px, 1024 by default: the refiner's size,
   overlapping by ``overlap``) goes through the VAE alone, into one latent image of the whole
   picture (blended across the overlaps), so the VAE's memory is that of one tile.
3. **Denoise in tiles** (:mod:`.tile_denoise`): all tiles at every step, one noise for the picture.
4. **Decode in tiles**, row of tiles by row of tiles, blended with cosine ramps into a band of rows
   as wide as the picture; rows that no later tile touches go back into the buffer (colour only: the
   enlarged alpha stays), so the working memory besides the buffer is one band, not the picture.

The colour path is the engine's (:mod:`.work_image`): transparent pixels get their neighbourhood's
colour for the model, float values above 1 are tone-mapped (one curve for the whole picture, from the
source's peak), linear light is encoded to sRGB and back. The invisible watermark goes on each decoded
tile (as diffusers marks every picture it decodes); tiles start on the 8 px grid of the whole picture,
so the marks of overlapping tiles line up. Progress counts tiles x denoising steps; cancel is checked
between any two UNet calls and between tiles of the VAE.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from krita_sdxl.protocol import Image, ImageSpec
from krita_sdxl.protocol.geometry import Box

from . import hdr, pixels
from .alpha_fill import fill_transparent
from .lanczos import lanczos, put
from .request import JobCancelled, ProgressFn, RefineRequest, StopFn
from .tile_denoise import denoise_tiles
from .tiling import TileWeights, TilingConfig, plan_tiles

log = logging.getLogger(__name__)

LATENT = 8  # pixels per latent a side


def capability(engine: Any) -> dict[str, Any]:
    """``welcome.capabilities.upscale``: the methods jobs may ask for, the upscaler model, the tiles."""
    model = getattr(engine, "upscaler", None)
    config = getattr(engine, "tiling", None) or TilingConfig()
    return {
        "methods": ["auto", "lanczos", *(["model"] if model is not None else [])],
        "model": model.describe() if model is not None else None,
        "tile": config.tile,
        "overlap": config.overlap,
    }


def chosen_upscaler(engine: Any, req: RefineRequest) -> Any:
    """The upscaler model the job enlarges with (None: Lanczos). ``auto``: the engine's, if it has one."""
    assert req.upscale is not None
    model = getattr(engine, "upscaler", None)
    if req.upscale.method == "lanczos":
        return None
    if req.upscale.method == "model" and model is None:
        raise ValueError("this engine has no upscaler model (start it with --upscaler FILE)")
    return model


def upscale_if_asked(engine: Any, req: RefineRequest, on_progress: ProgressFn, should_stop: StopFn) -> Image | None:
    """The engine hook: run ``req`` as an upscale job and return its result; None when it is not one."""
    if getattr(req, "upscale", None) is None:
        return None
    spec = req.result_spec
    if should_stop():
        raise JobCancelled()
    model = chosen_upscaler(engine, req)
    size = (spec.width, spec.height)
    if model is None:
        buffer = lanczos(req.image, size)
    else:
        buffer = model.enlarge(req.image, size, req.transfer, should_stop)
    if req.plan.denoise_steps > 0:
        config = getattr(engine, "tiling", None) or TilingConfig()
        refine_in_place(engine, buffer, spec, req, config, on_progress, should_stop)
    return Image(spec, buffer)


# --- the picture in and out of the model ------------------------------------------------------------


def source_tone(image: Image) -> hdr.ToneMap | None:
    """One tone map for the whole picture (float pictures with values above 1), from the source's peak."""
    if image.spec.sample != "float":
        return None
    rgb, _alpha = pixels.to_rgb_alpha(image, clip=False)
    return hdr.tone_map(rgb)[1]


def model_input(samples: np.ndarray, spec: ImageSpec, tone: hdr.ToneMap | None, transfer: str) -> np.ndarray:
    """A tile of the enlarged picture (its samples) as the model takes it: RGB float32 in [0, 1]."""
    height, width = samples.shape[:2]
    tile = Image(ImageSpec(width, height, spec.order, spec.depth, spec.sample), np.ascontiguousarray(samples))
    rgb, alpha = pixels.to_rgb_alpha(tile, clip=False)
    if spec.sample == "float":
        hdr.sanitize(rgb, copy=False)
    rgb = fill_transparent(rgb, alpha)
    rgb = tone.apply(rgb) if tone is not None else np.clip(rgb, 0.0, 1.0)
    return pixels.linear_to_srgb(rgb) if transfer == "linear" else rgb


def write_colour(
    rows: np.ndarray, target: np.ndarray, spec: ImageSpec, tone: hdr.ToneMap | None, transfer: str
) -> None:
    """The model's RGB (float32 in [0, 1]) back into ``target``'s colour channels, in the document's encoding."""
    if transfer == "linear":
        rows = pixels.srgb_to_linear(rows)
    if tone is not None:
        rows = tone.restore(rows)
    channels = [0, 0, 0] if spec.order == "L" else [spec.order.index(c) for c in "RGB"]
    for c, index in enumerate(channels):
        put(target[..., index], rows[..., c], spec)


def _padded(buffer: np.ndarray, box: Box) -> np.ndarray:
    """``box`` of the buffer; the part past its right and bottom edges (under 8 px) mirrors the picture."""
    height, width = buffer.shape[:2]
    part = buffer[box.y : min(box.bottom, height), box.x : min(box.right, width)]
    pad_y, pad_x = box.bottom - min(box.bottom, height), box.right - min(box.right, width)
    if pad_y or pad_x:
        part = np.pad(part, ((0, pad_y), (0, pad_x), (0, 0)), mode="symmetric")
    return part


# --- tiles ----------------------------------------------------------------------------------------


def latent_tiles(width: int, height: int, config: TilingConfig) -> list[Box]:
    """Tiles of the picture's latents (a picture padded to a multiple of 8), row by row."""
    tile = max(1, config.tile // LATENT)
    overlap = min(config.overlap // LATENT, tile - 1)
    return plan_tiles(math.ceil(width / LATENT), math.ceil(height / LATENT), tile, overlap, multiple=1)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20  # bytes: arrays this large or larger are mapped, and given back when freed


def keep_big_arrays_out_of_the_heap() -> None:
    """Fix glibc's mmap threshold (Linux; elsewhere nothing). By default glibc raises it as big blocks are freed
    (up to 32 MiB), so a tile's arrays, freed and made again in other shapes, come from the heap, whose holes
    keep the process's RSS growing with the number of tiles (measured on the CPU demo: +150 MiB for four 1024 px
    tiles instead of +40). A fixed threshold maps every array of 1 MiB or more and unmaps it when it is freed."""
    global _THRESHOLD_SET
    if _THRESHOLD_SET:
        return
    _THRESHOLD_SET = True
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
        if mallopt is not None:
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except OSError:
        pass


_THRESHOLD_SET = False


def _pixels(box: Box) -> Box:
    return Box(box.x * LATENT, box.y * LATENT, box.width * LATENT, box.height * LATENT)


class BandWriter:
    """Blends decoded tiles, row of tiles by row of tiles, into a band of rows as wide as the (padded)
    picture, and writes the rows that are final into the buffer's colour channels."""

    def __init__(self, buffer: np.ndarray, spec: ImageSpec, tiles: list[Box], tone: Any, transfer: str) -> None:
        self.buffer, self.spec, self.tone, self.transfer = buffer, spec, tone, transfer
        self.weights = TileWeights(tiles)
        width = max(b.right for b in tiles)
        self.band = np.zeros((max(b.height for b in tiles), width, 3), dtype=np.float32)
        self.top = 0  # the picture row of the band's first row

    def add(self, box: Box, rgb: np.ndarray) -> None:
        y = box.y - self.top
        self.band[y : y + box.height, box.x : box.right] += rgb * self.weights(box)[..., None]

    def flush(self, until: int) -> None:
        """Rows above ``until`` are final: into the buffer; the band moves down to start at ``until``."""
        done = until - self.top
        height, width = self.buffer.shape[:2]
        rows = min(until, height) - self.top
        if rows > 0:
            target = self.buffer[self.top : self.top + rows, :width]
            write_colour(self.band[:rows, :width], target, self.spec, self.tone, self.transfer)
        self.band[: len(self.band) - done] = self.band[done:].copy()
        self.band[len(self.band) - done :] = 0.0
        self.top = until


def refine_in_place(
    engine: Any,
    buffer: np.ndarray,
    spec: ImageSpec,
    req: RefineRequest,
    config: TilingConfig,
    on_progress: ProgressFn,
    should_stop: StopFn,
) -> None:
    """Refine the enlarged picture in ``buffer`` (its samples, height x width x channels) in tiles."""
    keep_big_arrays_out_of_the_heap()
    tone = source_tone(req.image)
    tiles = latent_tiles(spec.width, spec.height, config)
    log.info(
        "upscale to %dx%d: %d tiles of up to %d px (overlap %d), %d steps each",
        spec.width, spec.height, len(tiles), config.tile, config.overlap, req.plan.denoise_steps,
    )  # fmt: skip
    weights = TileWeights(tiles)
    device = torch.device(engine.device)
    rows, cols = max(b.bottom for b in tiles), max(b.right for b in tiles)
    latents = torch.zeros((1, 4, rows, cols), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for box in tiles:
            if should_stop():
                raise JobCancelled()
            rgb = model_input(_padded(buffer, _pixels(box)), spec, tone, req.transfer)
            share = torch.from_numpy(weights(box)).to(device)[None, None]
            latents[..., box.y : box.bottom, box.x : box.right] += engine._encode(rgb).float() * share
            del rgb
        latents = denoise_tiles(engine, latents, tiles, req, on_progress, should_stop)
        writer = BandWriter(buffer, spec, [_pixels(b) for b in tiles], tone, req.transfer)
        starts = sorted({b.y for b in tiles})
        for n, top in enumerate(starts):
            for box in (b for b in tiles if b.y == top):
                if should_stop():
                    raise JobCancelled()
                rgb = engine._decode(latents[..., box.y : box.bottom, box.x : box.right])
                watermark = getattr(engine, "watermark", None)
                if watermark is not None:  # on the decoded values before the clamp, as stock (work_image.finish)
                    rgb = watermark.apply(rgb)
                rgb = np.clip(rgb, 0.0, 1.0)
                writer.add(_pixels(box), rgb)
                del rgb
            writer.flush(starts[n + 1] * LATENT if n + 1 < len(starts) else rows * LATENT)
    if getattr(engine, "speed", None) is not None:
        engine.speed.after_job()
