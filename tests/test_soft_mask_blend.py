"""A soft selection blends the result into the artist's pixels once, by the mask's value.

Where the mask is 0.5 the returned pixels are halfway between the source and the model's result, for
a layer without alpha (colour blended) and for one with alpha (the result's colour under alpha x mask,
which Krita composites over the source). Before the fix the pixels were pre-blended by the mask and
then blended (or masked) again: a 0.5 mask moved them only a quarter of the way (m squared).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from krita_sdxl.backend.engine import pixels, work_image
from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.backend.engine.tiling import TilingConfig
from krita_sdxl.protocol import Image, ImageSpec, plan_img2img

W, H = 48, 32
SOURCE = np.array([0.2, 0.4, 0.6], np.float32)
RESULT = np.array([1.0, 0.9, 0.0], np.float32)  # what the "model" returns everywhere


def mask_image() -> tuple[Image, np.ndarray]:
    """Left third 0, middle third 0.5, right third 1 (as 8-bit samples)."""
    m = np.zeros((H, W), np.float32)
    m[:, W // 3 : 2 * W // 3] = 128 / 255
    m[:, 2 * W // 3 :] = 1.0
    return Image(ImageSpec(W, H, "L", 8), np.rint(m * 255).astype(np.uint8).tobytes()), m


def source_image(order: str) -> Image:
    rgb = np.broadcast_to(SOURCE, (H, W, 3))
    planes = {"R": rgb[..., 0], "G": rgb[..., 1], "B": rgb[..., 2], "A": np.ones((H, W), np.float32)}
    data = np.stack([planes[c] for c in order], axis=-1)
    return Image(ImageSpec(W, H, order, 8), np.rint(data * 255).astype(np.uint8).tobytes())


def finish(order: str, feather: float = 0.0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    mask_img, m = mask_image()
    req = RefineRequest(
        source_image(order), "", "", 0.5, plan_img2img(10, 0.5), 1, 5.0, 6.0, 2.5, mask=mask_img, feather=feather
    )
    job = work_image.prepare(req, pixels.image_mask(req.image, mask_img))
    out = work_image.finish(job, np.broadcast_to(RESULT, (H, W, 3)).astype(np.float32))
    rgb, alpha = pixels.to_rgb_alpha(out)
    return rgb, alpha, m


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_a_layer_without_alpha_moves_halfway_where_the_mask_is_half(order: str) -> None:
    rgb, alpha, m = finish(order)
    assert alpha is None
    want = SOURCE + m[..., None] * (RESULT - SOURCE)
    assert np.abs(rgb - want).max() <= 1.5 / 255, np.abs(rgb - want).max()
    assert np.array_equal(np.rint(rgb[:, : W // 3] * 255), np.broadcast_to(np.rint(SOURCE * 255), (H, W // 3, 3)))


@pytest.mark.parametrize("order", ["RGBA", "BGRA"])
def test_a_layer_with_alpha_composites_halfway_over_its_source(order: str) -> None:
    rgb, alpha, m = finish(order)
    assert alpha is not None
    assert np.abs(alpha - m).max() <= 1 / 255  # alpha x mask, the source's alpha being 1
    composite = SOURCE * (1 - alpha[..., None]) + rgb * alpha[..., None]  # Krita's normal blend over the source
    want = SOURCE + m[..., None] * (RESULT - SOURCE)
    assert np.abs(composite - want).max() <= 1.5 / 255, np.abs(composite - want).max()
    assert np.array_equal(np.rint(rgb[:, : W // 3] * 255), np.broadcast_to(np.rint(SOURCE * 255), (H, W // 3, 3)))


def test_with_feather_the_blend_follows_the_feathered_mask_once() -> None:
    rgb, _, m = finish("RGB", feather=6.0)
    feathered = pixels.feather_inward(m, 6.0)
    want = SOURCE + feathered[..., None] * (RESULT - SOURCE)
    assert np.abs(rgb - want).max() <= 1.5 / 255, np.abs(rgb - want).max()


# --- through the real engine, whole and in tiles -----------------------------------------------


@pytest.fixture(scope="module")
def engine(demo_models: Any) -> Engine:
    return Engine.load(demo=True, device="cpu", cache_dir=demo_models.refiner.parent.parent, watermark=False)


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
def test_the_engine_blends_a_soft_selection_once(engine: Engine, tiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo engine runs its real path (prepare, encode, denoise with the latent hold, finish, and
    the tiles' blend) with a decoder that returns one colour, so the expected pixels are known.
    Tiled, each tile pre-blended its colour by its mask and the whole was blended again (m squared)."""
    size = (150, 97) if tiled else (48, 32)
    monkeypatch.setattr(engine, "tiling", TilingConfig(threshold=64 * 64, tile=64, overlap=16), raising=False)

    def decode(latents: torch.Tensor) -> np.ndarray:
        h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
        return np.broadcast_to(RESULT, (h, w, 3)).astype(np.float32)

    monkeypatch.setattr(engine, "_decode", decode)
    w, h = size
    m = np.zeros((h, w), np.float32)
    m[:, w // 3 : 2 * w // 3] = 128 / 255
    m[:, 2 * w // 3 :] = 1.0
    mask = Image(ImageSpec(w, h, "L", 8), np.rint(m * 255).astype(np.uint8).tobytes())
    src = np.broadcast_to(SOURCE, (h, w, 3))
    image = Image(ImageSpec(w, h, "RGB", 8), np.rint(src * 255).astype(np.uint8).tobytes())
    req = RefineRequest(image, "", "", 0.5, plan_img2img(4, 0.5), 1, 5.0, 6.0, 2.5, mask=mask)
    steps: list[int] = []
    out = engine.refine(req, lambda s, t, p: steps.append(t), lambda: False)
    rgb, _ = pixels.to_rgb_alpha(out)
    want = SOURCE + m[..., None] * (RESULT - SOURCE)
    assert np.abs(rgb - want).max() <= 1.5 / 255, np.abs(rgb - want).max()
    assert steps and (steps[-1] > 2) == tiled  # tiled: the progress counts every refined tile's steps
