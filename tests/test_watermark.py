"""The invisible SDXL watermark is on the picture the engine returns, read back with the real decoder.

The plugin sends a work size with every job (about one megapixel), so the model's picture is resized
back to the selection's size before it is returned: a mark applied before that resize is lost (23 to
26 of 48 bits read back, what an unmarked picture gives).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from krita_sdxl.backend.engine import pixels
from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.protocol import Image, ImageSpec, plan_img2img

pytest.importorskip("imwatermark", reason="invisible-watermark is the optional [watermark] extra (CI installs it)")


@pytest.fixture(scope="module")
def engine(demo_models: Any) -> Engine:
    engine = Engine.load(demo=True, device="cpu", cache_dir=demo_models.refiner.parent.parent, speed="off")
    assert engine.watermark.status == "active"
    return engine


def picture(size: int, height: int | None = None) -> Image:
    height = height or size
    y, x = np.mgrid[0:height, 0:size].astype(np.float32) / size
    rgb = np.stack([x, y, 0.5 + 0.3 * np.sin(40 * x) * np.cos(30 * y), np.ones_like(x)], axis=-1)
    return Image(ImageSpec(size, height, "RGBA", 8), np.rint(rgb * 255).astype(np.uint8).tobytes())


def bits_read(image: Image) -> int:
    """How many of the 48 bits of diffusers' SDXL message the real decoder reads from ``image``."""
    from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS
    from imwatermark import WatermarkDecoder

    rgb = pixels.samples(image)[..., :3]
    bits = WatermarkDecoder("bits", 48).decode(np.ascontiguousarray(rgb[..., ::-1]), "dwtDct")
    return sum(int(a == b) for a, b in zip(bits, WATERMARK_BITS, strict=True))


def job(image: Image, work: tuple[int, int] | None = None, **kw: Any) -> RefineRequest:
    return RefineRequest(image, "a cat", "", 0.25, plan_img2img(4, 0.25), 3, 5.0, 6.0, 2.5, work_size=work, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("size", [400, 600, 1400])
def test_the_returned_picture_carries_the_mark_after_the_work_size_round_trip(engine: Engine, size: int) -> None:
    out = engine.refine(job(picture(size), work=(1024, 1024)), lambda *a: None, lambda: False)
    read = bits_read(out)
    print(f"watermark: {size}x{size} px via a 1024 px work size: {read} of 48 bits read")
    assert read >= 46


def test_the_mark_leaves_the_pixels_outside_the_mask_as_they_were(engine: Engine) -> None:
    image = picture(256)
    mask = np.zeros((256, 256), np.uint8)
    mask[:, :200] = 255
    req = job(image, mask=Image(ImageSpec(256, 256, "L"), mask.tobytes()), keep_unmasked=True)
    out = engine.refine(req, lambda *a: None, lambda: False)
    before, after = pixels.samples(image)[..., :3], pixels.samples(out)[..., :3]
    assert np.array_equal(after[:, 200:], before[:, 200:])  # bit for bit, watermark or not
    assert np.abs(after[:, :200].astype(int) - before[:, :200]).mean() > 2  # refined (and marked) inside


def test_no_mark_below_256_px_as_diffusers(engine: Engine) -> None:
    """diffusers marks pictures at least 256 px wide (the encoder fails on shorter ones, so both sides)."""
    image = picture(255, 96)
    marked = engine.refine(job(image), lambda *a: None, lambda: False)
    saved, engine.watermark = engine.watermark, type(engine.watermark)(enabled=False)
    try:
        plain = engine.refine(job(image), lambda *a: None, lambda: False)
    finally:
        engine.watermark = saved
    assert bytes(marked.data) == bytes(plain.data)
