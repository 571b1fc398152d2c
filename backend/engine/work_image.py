"""The picture a job's model runs on, and the way its result goes back into the document.

One place for the colour path of every job, whole (:mod:`.engine`) or in tiles (:mod:`.tiling`):

On the way in (:func:`prepare`), from the document's pixels:

1. fully transparent pixels get the colour of their visible neighbourhood (:mod:`.alpha_fill`),
   so the colour hidden under them does not bleed into visible edges;
2. a float picture whose selected pixels go above 1 is tone-mapped into [0, 1] (:mod:`.hdr`; the
   context's values do not decide it);
3. linear-light pixels are encoded to sRGB (the model was trained on sRGB pictures);
4. the picture is resized to the job's work size.

On the way back (:func:`finish`), from the model's result at the work size:

1. resized back to the document's size;
2. the invisible watermark, where it is on (see below), on the decoded values before they are clamped
   to [0, 1], as diffusers marks them; then the clamp;
3. sRGB back to linear light, the tone map undone (values above 1 come back);
4. the source's own pixels back where the mask is 0 (the artist's pixels outside a selection are
   never changed), and the result in the document's format by the output rule of :mod:`.pixels`
   (alpha kept, or multiplied by the feathered mask; the mask alone for a picture painted from noise).

The watermark goes on the returned picture (after the resize back and, in a tiled job, after the
tiles are blended) in the display encoding the model works in (sRGB, tone-mapped): that is the
picture diffusers would have marked, and the encoding people view and export. It goes on before
the source's pixels are put back outside the mask: what the artist did not ask to change stays
bit for bit as it was (as diffusers' inpaint pipeline, whose ``apply_overlay`` puts the original
back after marking). The mark is only readable where the picture was refined, and only on pictures
of at least 256 px a side (:mod:`.watermark`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from krita_sdxl.protocol import Image

from . import hdr, pixels
from .alpha_fill import fill_transparent
from .request import RefineRequest


@dataclass(frozen=True)
class WorkImage:
    """One job's picture for the model, and what :func:`finish` needs to bring the result back."""

    req: RefineRequest
    rgb: np.ndarray  # the model's input: HxWx3 float32 in [0, 1] at the work size
    source: np.ndarray  # the document's own colour (finite, not clipped), kept outside the mask
    mask: np.ndarray | None  # the job's mask at the document's size
    work: tuple[int, int] | None  # (width, height) the model runs at, when it is not the document's
    tone: hdr.ToneMap | None  # the tone map to undo (None: nothing above 1)

    @property
    def run_mask(self) -> np.ndarray | None:
        """The mask at the work size."""
        if self.mask is None or self.work is None:
            return self.mask
        return pixels.resize(self.mask, self.work)


def work_size(req: RefineRequest) -> tuple[int, int] | None:
    """The job's work size when it differs from the image's own size, else None."""
    spec = req.image.spec
    return req.work_size if req.work_size and req.work_size != (spec.width, spec.height) else None


def prepare(req: RefineRequest, mask: np.ndarray | None = None) -> WorkImage:
    """The model's input for ``req``; ``mask``: the job's mask as a float array (checked already by
    :func:`.pixels.image_mask`), None when it has none."""
    source, alpha = pixels.to_rgb_alpha(req.image, clip=False)
    float_samples = req.image.spec.sample == "float"  # integer samples are in [0, 1] already
    if float_samples:
        hdr.sanitize(source, copy=False)  # (a fresh array)
    rgb, tone = fill_transparent(source, alpha), None
    if float_samples:  # the curve is decided by the selected pixels alone (the context may be brighter)
        rgb, tone = hdr.tone_map(rgb, None if mask is None else mask > 0.0)
    if req.transfer == "linear":
        rgb = pixels.linear_to_srgb(rgb)
    work = work_size(req)
    if work is not None:
        rgb = pixels.resize(rgb, work)
    return WorkImage(req, rgb, source, mask, work, tone)


def finish(job: WorkImage, out: np.ndarray, watermark: Any = None) -> Image:
    """The result in the document's size and format from the model's result ``out`` (HxWx3 on the [0, 1]
    scale at the work size, as decoded: not yet clamped, so that the watermark marks what stock marks).
    ``watermark``: a :class:`.watermark.Watermark` to mark the returned picture with (None for a tile: the
    tiled job marks the blended whole). A tile's mask reaches
    only its alpha (tiles are opaque RGBA, backend/engine/tiling.py), so the whole is blended once."""
    req, spec = job.req, job.req.image.spec
    if job.work is not None:
        out = pixels.resize(out, (spec.width, spec.height))
    if watermark is not None:  # on the decoded picture before the clamp, as stock marks it
        out = watermark.apply(out)
    out = np.clip(out, 0.0, 1.0)
    if req.transfer == "linear":
        out = pixels.srgb_to_linear(out)
    if job.tone is not None:
        out = job.tone.restore(out)
    mask = job.mask
    if mask is not None and req.keep_unmasked:
        # only where the mask is 0: the output rule blends (or masks) by the mask itself, so blending
        # here as well would apply a soft mask twice (m squared: a 0.5 mask moved pixels a quarter of the way)
        out = np.where((mask <= 0.0)[..., None], job.source, out).astype(np.float32)
    if mask is not None and req.feather > 0:
        mask = pixels.feather_inward(mask, req.feather)
    from_noise = req.stages is not None and not req.stages.from_source  # the source gave only the size
    return Image(spec, pixels.merge_result(out, req.image, mask, opaque=from_noise))
