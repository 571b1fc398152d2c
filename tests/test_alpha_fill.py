"""Transparent layers: the colour hidden under fully transparent pixels must not reach the visible edges.

The test shape is a disc in one colour with a soft edge (alpha falling from 1 to 0 over 4 px, a soft
brush's edge) on a layer whose fully transparent pixels are black, as Krita stores an erased or
never-painted area. The demo model's pictures are noise, so what is measured is the colour the model
is given (and the colour the identity path gives back): the resize to the work size alone drags the
black into the edge; the VAE (one latent per 8x8 work pixels) drags it further with a real model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from krita_sdxl.backend.engine import pixels, work_image
from krita_sdxl.backend.engine.alpha_fill import fill_transparent
from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.protocol import Image, ImageSpec, plan_img2img

SIZE, WORK = 160, (64, 64)
COLOUR = np.array([0.9, 0.6, 0.2], np.float32)


def disc() -> tuple[np.ndarray, np.ndarray]:
    """(RGB, alpha): the disc's colour where alpha > 0, black under the fully transparent pixels."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    alpha = np.clip((56.0 - np.hypot(x - 80, y - 80)) / 4.0, 0.0, 1.0).astype(np.float32)
    rgb = np.where((alpha > 0)[..., None], COLOUR, 0.0).astype(np.float32)
    return rgb, alpha


def layer() -> Image:
    rgb, alpha = disc()
    data = np.concatenate([rgb, alpha[..., None]], axis=-1)
    return Image(ImageSpec(SIZE, SIZE, "RGBA", 16), np.rint(data * 65535).astype("<u2").tobytes())


def band_error(rgb: np.ndarray, alpha: np.ndarray) -> tuple[float, float]:
    """(how far the visible edge band's colour is from the disc's on average, the band's darkest
    pixel's brightness as a fraction of the disc's); the band: 0.02 < alpha < 0.98."""
    band = (alpha > 0.02) & (alpha < 0.98)
    assert band.sum() > 20
    return float(np.abs(rgb[band] - COLOUR).mean()), float(rgb[band].mean(axis=-1).min() / COLOUR.mean())


def test_fill_takes_the_colour_of_the_visible_neighbourhood() -> None:
    rgb, alpha = disc()
    filled = fill_transparent(rgb, alpha)
    assert np.array_equal(filled[alpha > 0], rgb[alpha > 0])  # visible pixels keep their own colour
    assert np.abs(filled - COLOUR).max() < 1e-5  # the holes get the disc's colour, not black
    assert fill_transparent(rgb, np.ones_like(alpha)) is rgb  # nothing transparent: untouched
    assert fill_transparent(rgb, None) is rgb


def test_fill_blends_two_colours_smoothly_by_distance() -> None:
    rgb = np.zeros((8, 64, 3), np.float32)
    alpha = np.zeros((8, 64), np.float32)
    rgb[:, :4], alpha[:, :4] = (1.0, 0.0, 0.0), 1.0  # red on the left, blue on the right
    rgb[:, -4:], alpha[:, -4:] = (0.0, 0.0, 1.0), 1.0
    red = fill_transparent(rgb, alpha)[4, :, 0]
    assert red[4] > 0.9 and red[-5] < 0.1  # next to an edge: that edge's colour
    assert np.all(np.diff(red[4:-4]) <= 1e-6)  # in between, it fades from one to the other


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_fill_changes_only_fully_transparent_pixels_and_stays_in_range(h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rgb = rng.random((h, w, 3), dtype=np.float32)
    alpha = np.where(rng.random((h, w)) < 0.6, 0.0, rng.random((h, w))).astype(np.float32)
    filled = fill_transparent(rgb, alpha)
    assert np.array_equal(filled[alpha > 0], rgb[alpha > 0])
    if (alpha > 0).any():
        assert filled.min() >= rgb[alpha > 0].min() - 1e-5 and filled.max() <= rgb[alpha > 0].max() + 1e-5


def test_the_edge_band_keeps_its_colour_through_the_resize_to_the_work_size_and_back() -> None:
    """The identity path (a model that changes nothing): the resize alone drags black into the edge."""
    rgb, alpha = disc()
    req = RefineRequest(layer(), "", "", 0.3, plan_img2img(10, 0.3), 1, 5.0, 6.0, 2.5, work_size=WORK)
    job = work_image.prepare(req)
    back, _ = pixels.to_rgb_alpha(work_image.finish(job, job.rgb))
    without = pixels.resize(pixels.resize(rgb, WORK), (SIZE, SIZE))  # the same path without the fill
    (filled_error, filled_darkest), (black_error, black_darkest) = band_error(back, alpha), band_error(without, alpha)
    print(f"edge band: colour error {filled_error:.4f} filled, {black_error:.4f} over black; darkest pixel at "
          f"{filled_darkest:.2f} filled, {black_darkest:.2f} over black of the disc's brightness")  # fmt: skip
    assert filled_error < 0.002 and filled_darkest > 0.99
    assert black_error > 0.04 and black_darkest < 0.6


@pytest.fixture(scope="module")
def engine(demo_models: Any) -> Engine:
    cache = demo_models.refiner.parent.parent
    return Engine.load(demo=True, device="cpu", cache_dir=cache, speed="off", watermark=False)


def test_the_model_sees_the_shape_colour_along_its_soft_edge(engine: Engine) -> None:
    seen: list[np.ndarray] = []

    def grab(module: Any, args: Any) -> None:
        seen.append((args[0][0].permute(1, 2, 0).float().numpy() + 1.0) * 0.5)

    hook = engine.vae.encoder.register_forward_pre_hook(grab)
    try:
        req = RefineRequest(layer(), "", "", 0.3, plan_img2img(10, 0.3), 1, 5.0, 6.0, 2.5, work_size=WORK)
        out = engine.refine(req, lambda *a: None, lambda: False)
    finally:
        hook.remove()
    _, alpha = disc()
    work_alpha = pixels.resize(alpha, WORK)
    error, darkest = band_error(seen[0], work_alpha)
    print(f"edge band at the model's input: colour error {error:.4f}, darkest pixel at {darkest:.2f}")
    assert error < 0.002 and darkest > 0.99  # over black (no fill): 0.08 and 0.38
    out_alpha = pixels.samples(out)[..., 3]
    assert np.array_equal(out_alpha, pixels.samples(req.image)[..., 3])  # alpha as it was
