"""The invisible SDXL watermark, applied as diffusers applies it by default.

diffusers' SDXL pipelines mark every image they decode (``StableDiffusionXLWatermarker``, a DWT-DCT
watermark carrying Stability AI's 48-bit message) whenever the ``invisible-watermark`` package is
importable. The engine decodes latents itself, so it applies the same watermarker after its own
decode. ``invisible-watermark`` pulls in OpenCV, so it is an optional extra
(``pip install 'krita-sdxl[watermark]'``); ``--no-watermark`` switches marking off. Images smaller
than 256 px on either side are left unmarked: the encoder refuses them (diffusers checks only the
width, so a wide strip less than 256 px high would fail there).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

ACTIVE, DISABLED, UNAVAILABLE = "active", "disabled", "unavailable"
MIN_SIDE = 256  # the encoder's smallest image side


def available() -> bool:
    from diffusers.utils import is_invisible_watermark_available

    return bool(is_invisible_watermark_available())


class Watermark:
    """``apply(rgb)`` marks an HxWx3 float image on the [0, 1] scale when marking is active. Give it the
    decoded picture before any clamp, as diffusers does (``StableDiffusionXLWatermarker`` runs on the VAE's
    output, then the pipeline clamps); a marked picture comes back within [0, 1]."""

    def __init__(self, enabled: bool = True) -> None:
        self._marker: Any = None
        if not enabled:
            self.status = DISABLED
        elif not available():
            self.status = UNAVAILABLE
            log.info("invisible watermark: the invisible-watermark package is not installed; images are not marked")
        else:
            from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker

            self._marker = StableDiffusionXLWatermarker()
            self.status = ACTIVE

    @property
    def active(self) -> bool:
        return self._marker is not None

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        if self._marker is None or min(rgb.shape[:2]) < MIN_SIDE:
            return rgb
        x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None] * 2.0 - 1.0
        try:
            y = self._marker.apply_watermark(x)
        except Exception:  # a watermark never fails a job
            log.exception("invisible watermark failed on a %dx%d image; left unmarked", rgb.shape[1], rgb.shape[0])
            return rgb
        return ((y[0].permute(1, 2, 0).float() + 1.0) * 0.5).clamp(0.0, 1.0).numpy()
