"""Masked denoising by latent blending ("soft inpainting"): only the masked area is re-noised.

After every denoising step the latents outside the mask are replaced by the source latents noised to
the level of the *next* step (and, after the last step, by the clean source latents), so the model
sees the real surroundings at every step and the inside grows into them without a seam. This is the
blend of diffusers' SDXL inpaint pipeline, applied through ``callback_on_step_end`` to the ordinary
img2img and text-to-image pipelines, with a soft mask (area-averaged to the latent grid).

The VAE decoder still smears latents a few pixels across the mask edge and its round trip is not
lossless, so :func:`keep_outside` finally puts the source pixels back where the mask is 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

NOISE_SEED_OFFSET = 0x5EED  # the blend noise comes from the job's seed, apart from the pipeline's


def fit_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Extend a HxW mask to (height, width) at the bottom and right by repeating its edge (as the
    work image is padded there)."""
    h, w = mask.shape
    if (h, w) == (height, width):
        return mask
    return np.pad(mask, ((0, height - h), (0, width - w)), mode="edge")


class LatentMask:
    """Holds the latents outside ``mask`` to ``source`` during denoising.

    ``source``: the scaled source latents (1, 4, h, w); ``mask``: float [0, 1] at the pixel size the
    latents were encoded from (h*8, w*8), 1 = re-noise and change, 0 = keep.
    """

    def __init__(self, source: torch.Tensor, mask: np.ndarray, seed: int) -> None:
        lh, lw = source.shape[-2:]
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        m = F.interpolate(m, size=(lh, lw), mode="area")
        self.source = source
        self.change = m.to(device=source.device, dtype=source.dtype)
        generator = torch.Generator("cpu").manual_seed((seed + NOISE_SEED_OFFSET) % 2**64)
        self.noise = torch.randn(source.shape, generator=generator, dtype=torch.float32).to(source.device)

    def target(self, scheduler: Any, like: torch.Tensor) -> torch.Tensor:
        """The source latents at the noise level of the scheduler's next step (clean after the last)."""
        index = getattr(scheduler, "step_index", None)
        source = self.source.to(like.dtype)
        sigmas = getattr(scheduler, "sigmas", None)
        if index is None or sigmas is None:  # not a sigma (Euler-family) scheduler
            timesteps = scheduler.timesteps
            if index is None or index >= len(timesteps):
                return source
            t = timesteps[index : index + 1]
            return scheduler.add_noise(source, self.noise.to(like.dtype), t)
        if index >= len(sigmas):
            return source
        sigma = float(sigmas[index])
        return source + self.noise.to(like.dtype) * sigma

    def blend(self, latents: torch.Tensor, scheduler: Any) -> torch.Tensor:
        change = self.change.to(latents.dtype)
        return latents * change + self.target(scheduler, latents) * (1.0 - change)


def keep_outside(result: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``source + mask * (result - source)``: the source pixels where the mask is 0, exactly."""
    m = mask[..., None] if result.ndim == 3 else mask
    out = source + m * (result - source)
    return np.where(m <= 0.0, source, out).astype(np.float32)
