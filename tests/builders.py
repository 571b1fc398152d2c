"""Test inputs shared by the engine and tiling tests: a structured picture and a refine request."""

from __future__ import annotations

from typing import Any

import numpy as np

from krita_sdxl.backend.engine import pixels
from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.protocol import Image, ImageSpec, plan_img2img


def make_image(width: int, height: int, order: str = "RGBA", depth: int = 8, sample: str = "uint") -> Image:
    spec = ImageSpec(width, height, order, depth, sample)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    planes = [x / width, y / height, 0.5 + 0.5 * np.sin(x / 7.0) * np.cos(y / 5.0), 0.2 + 0.6 * (x > width / 2)]
    values = np.stack(planes[: spec.channels], axis=-1)
    if sample == "uint":
        values = np.rint(values * (2**depth - 1))
    return Image(spec, values.astype(pixels.numpy_dtype(spec)).tobytes())


def make_request(image: Image, steps: int = 10, strength: float = 0.3, **kw: Any) -> RefineRequest:
    fields: dict[str, Any] = {
        "prompt": "a photo of a cat",
        "negative_prompt": "blurry",
        "strength": strength,
        "plan": plan_img2img(steps, strength),
        "seed": 1,
        "guidance_scale": 5.0,
        "aesthetic_score": 6.0,
        "negative_aesthetic_score": 2.5,
    }
    fields.update(kw)
    return RefineRequest(image=image, **fields)
