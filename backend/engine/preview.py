"""Cheap per-step previews: SDXL latents to a small RGBA image without running the VAE.

Each of the 4 latent channels contributes linearly to R, G and B (plus a bias); the result is in
about [-1, 1] like the VAE's output. The factors are the SDXL values used by ComfyUI's latent
previewer (``comfy/latent_formats.py``, class SDXL), fitted against the SDXL VAE on scaled latents
(the ones the sampler works on, i.e. VAE latents x 0.13025). One latent pixel gives one preview
pixel, so the preview is 1/8 of the work size on each side.
"""

from __future__ import annotations

import numpy as np
import torch

from krita_sdxl.protocol import MAX_CHUNK_BYTES, Image, ImageSpec

# rows: latent channels 0..3; columns: R, G, B
SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latents_to_preview(latents: torch.Tensor) -> Image:
    """(1, 4, h, w) scaled SDXL latents -> a w x h RGBA 8-bit image (opaque); above 1 MiB (latents
    larger than 512x512, a work size above 4096x4096) every n-th latent pixel, to fit one frame."""
    if latents.ndim != 4 or latents.shape[1] != 4:
        raise ValueError(f"expected latents of shape (1, 4, h, w), got {tuple(latents.shape)}")
    x = torch.nan_to_num(latents[0].detach().float())
    factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, dtype=torch.float32, device=x.device)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32, device=x.device)
    rgb = torch.einsum("chw,ck->hwk", x, factors) + bias  # about [-1, 1]
    rgb = ((rgb + 1.0) * 127.5).clamp(0.0, 255.0).round().to(torch.uint8).cpu().numpy()
    step = 1
    while (rgb.shape[0] // step or 1) * (rgb.shape[1] // step or 1) * 4 > MAX_CHUNK_BYTES:
        step += 1  # a preview is one frame of at most 1 MiB (the protocol's largest): every step-th pixel
    rgb = rgb[::step, ::step]
    h, w = rgb.shape[:2]
    out = np.empty((h, w, 4), dtype=np.uint8)
    out[..., :3] = rgb
    out[..., 3] = 255
    return Image(ImageSpec(w, h, "RGBA", 8, "uint"), out.tobytes())
