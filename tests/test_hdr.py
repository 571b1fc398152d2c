"""Float documents: values above 1.0 come back (the model refines a tone-mapped picture)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from krita_sdxl.backend.engine import hdr, pixels, work_image
from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.protocol import Image, ImageSpec, plan_img2img

W, H = 64, 48
LAMP = (slice(8, 40), slice(16, 48))  # a flat 32x32 patch at 2.5


def document(transfer_values: str = "srgb") -> np.ndarray:
    """RGBA float: a gradient in [0, 1] with a flat 2.5 lamp (and a 1.0 white patch beside it)."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    rgba = np.stack([x / W, y / H, 0.5 + 0.4 * np.sin(x / 4.0), np.ones_like(x)], axis=-1)
    rgba[LAMP] = (2.5, 2.5, 2.5, 1.0)
    rgba[0:8, 0:8, :3] = 1.0
    return rgba.astype(np.float32)


def as_image(rgba: np.ndarray, depth: int = 32) -> Image:
    dtype = "<f4" if depth == 32 else "<f2"
    return Image(ImageSpec(W, H, "RGBA", depth, "float"), rgba.astype(dtype).tobytes())


def request(image: Image, strength: float = 0.1, **kw: Any) -> RefineRequest:
    return RefineRequest(image, "a lamp", "", strength, plan_img2img(20, strength), 1, 5.0, 6.0, 2.5, **kw)


def colour(image: Image) -> np.ndarray:
    return pixels.samples(image)[..., :3].astype(np.float32)


# --- the curve -------------------------------------------------------------------------------------


def test_pictures_within_0_to_1_are_not_touched() -> None:
    rgb = np.random.default_rng(0).random((8, 8, 3), dtype=np.float32)
    mapped, curve = hdr.tone_map(rgb)
    assert curve is None and np.array_equal(mapped, rgb)


@settings(max_examples=50, deadline=None)
@given(st.floats(1.01, 1000.0), st.integers(0, 2**32 - 1))
def test_the_curve_is_undone_exactly_keeps_hue_and_leaves_the_toe_alone(peak: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rgb = (rng.random((16, 16, 3)) * peak).astype(np.float32)
    rgb[0, 0] = (peak, peak / 2, 0.0)
    mapped, curve = hdr.tone_map(rgb)
    assert curve is not None and 0.0 <= mapped.min() and mapped.max() <= 1.0
    ulp = float(np.finfo(np.float32).eps)  # the mapped values' precision, times the curve's gain on the way back
    assert np.allclose(curve.restore(mapped), rgb, rtol=1e-5, atol=1e-6 + 2 * ulp * curve.gain)
    toe = rgb.max(axis=-1) <= hdr.KNEE
    assert np.array_equal(mapped[toe], rgb[toe])  # shadows and mid-tones reach the model as they are
    bright = rgb.max(axis=-1) > 0.1
    ratio = mapped[bright] / mapped[bright].max(axis=-1, keepdims=True)
    assert np.allclose(ratio, rgb[bright] / rgb[bright].max(axis=-1, keepdims=True), atol=1e-5)  # same hue


# --- the identity path: the colour path with a model that changes nothing (or a little) -------------


@pytest.mark.parametrize("transfer", ["srgb", "linear"])
@pytest.mark.parametrize("work", [None, (32, 24)])
def test_the_identity_path_gives_back_values_above_1_and_leaves_0_to_1_alone(
    transfer: str, work: tuple[int, int] | None
) -> None:
    rgba = document()
    job = work_image.prepare(request(as_image(rgba), transfer=transfer, work_size=work))
    assert job.tone is not None and job.rgb.max() <= 1.0
    back = colour(work_image.finish(job, job.rgb))
    inner = (slice(20, 28), slice(28, 36))  # the lamp's middle (beyond the reach of the resize's ringing)
    assert np.allclose(back[inner], 2.5, rtol=1e-4)
    if work is None:  # no resampling: every value comes back
        assert np.allclose(back, rgba[..., :3], rtol=1e-5, atol=1e-6)


def test_a_model_that_is_off_by_2_levels_gives_the_lamp_back_within_the_curves_gain() -> None:
    """At low strength a good model returns a flat area within about 2/255; above the knee the curve's
    inverse multiplies that by its gain ((2.5 - 0.8) / (1 - 0.8) = 8.5): 2.5 +- 0.067."""
    job = work_image.prepare(request(as_image(document())))
    error = 2.0 / 255.0
    off = np.clip(job.rgb + np.random.default_rng(1).uniform(-error, error, job.rgb.shape), 0.0, 1.0)
    back = colour(work_image.finish(job, off.astype(np.float32)))
    assert job.tone is not None and job.tone.gain == pytest.approx(8.5)
    assert np.abs(back[LAMP] - 2.5).max() <= error * job.tone.gain + 1e-5
    toe = document()[..., :3].max(axis=-1) <= hdr.KNEE - error  # stays below the knee
    assert np.abs(back[toe] - document()[..., :3][toe]).max() <= error + 1e-6  # the toe: as off as the model


# --- the engine, with the demo model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(demo_models: Any) -> Engine:
    cache = demo_models.refiner.parent.parent
    return Engine.load(demo=True, device="cpu", cache_dir=cache, speed="off", watermark=False)


@pytest.mark.parametrize("depth", [16, 32])
def test_the_engine_refines_the_tone_mapped_picture_and_restores_the_range(engine: Engine, depth: int) -> None:
    """The demo model's pictures are noise, so its result is not near the input; what is checked is
    that the model gets the tone-mapped picture (the lamp at 1.0, not a clipped copy of the white
    beside it) and that what comes back is the model's picture with the range restored."""
    given, taken = [], []
    hooks = [
        engine.vae.encoder.register_forward_pre_hook(lambda m, a: given.append(a[0][0].permute(1, 2, 0) * 0.5 + 0.5)),
        engine.vae.decoder.register_forward_hook(lambda m, a, out: taken.append(out[0].permute(1, 2, 0))),
    ]
    try:
        image = as_image(document(), depth)
        out = engine.refine(request(image), lambda *a: None, lambda: False)
    finally:
        for hook in hooks:
            hook.remove()
    seen = given[0].float().numpy()
    curve = hdr.ToneMap(2.5)
    assert np.allclose(seen[LAMP], 1.0, atol=1e-6)
    assert np.allclose(seen[0:8, 0:8], curve.apply(np.ones((8, 8, 3), np.float32)), atol=1e-6)  # white: 0.82
    decoded = ((torch.clamp(taken[0].float(), -1.0, 1.0) + 1.0) * 0.5).numpy()
    expected = curve.restore(decoded)
    tolerance = 1e-5 if depth == 32 else 2e-3 * expected.max()
    assert np.allclose(colour(out), expected, rtol=1e-3, atol=tolerance)
    assert colour(out).max() > 1.0  # where the model's picture is above the knee, it goes above 1


# --- the selection decides the curve, not the context around it ----------------------------------------


def mask_image(rows: slice, cols: slice) -> Image:
    mask = np.zeros((H, W), np.uint8)
    mask[rows, cols] = 255
    return Image(ImageSpec(W, H, "L", 8), mask.tobytes())


def test_the_curve_comes_from_the_selected_pixels() -> None:
    rgba = document()
    rgba[0:8, 56:64, :3] = 6.0  # a brighter lamp in the context, outside the selection
    job = work_image.prepare(request(as_image(rgba), mask=mask_image(*LAMP)), pixels.image_mask(
        as_image(rgba), mask_image(*LAMP)))  # fmt: skip
    assert job.tone is not None and job.tone.peak == pytest.approx(2.5)  # the selection's peak, not 6.0


def test_a_selection_without_values_above_1_is_refined_as_in_an_sdr_document(engine: Engine) -> None:
    """The context holds a 2.5 lamp; the selection (left of it) nothing above 1.0: the selected pixels come
    back exactly as from the same document with its context clipped to 1, and the lamp as it was."""
    selection = (slice(0, H), slice(0, 12))
    bright = document()
    sdr = bright.copy()
    sdr[..., :3] = np.minimum(sdr[..., :3], 1.0)
    jobs = [request(as_image(rgba), strength=0.5, mask=mask_image(*selection)) for rgba in (bright, sdr)]
    outs = [colour(engine.refine(job, lambda *a: None, lambda: False)) for job in jobs]
    assert np.array_equal(outs[0][selection], outs[1][selection])
    assert np.array_equal(outs[0][LAMP], bright[LAMP][..., :3])  # outside the selection: as it was
