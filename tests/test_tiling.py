"""Large-layer tiling: the tile plan, the blend weights, and the tiled refine on the tiny demo model."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise
from typing import Any

import numpy as np
import pytest
from builders import make_image, make_request
from hypothesis import given, settings
from hypothesis import strategies as st

from krita_sdxl.backend.engine import pixels
from krita_sdxl.backend.engine.request import JobCancelled, RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.backend.engine.tiling import (
    TileWeights,
    TilingConfig,
    blend_weights,
    map_tiles,
    plan_axis,
    plan_tiles,
    refine_if_large,
)
from krita_sdxl.protocol import Image, ImageSpec
from krita_sdxl.protocol.geometry import Box

# --- strategies ----------------------------------------------------------------------------------


@st.composite
def layouts(draw: Any, max_tiles: int = 12) -> tuple[int, int, int, int]:
    """(width, height, tile, overlap): tile a multiple of 8, 0 <= overlap < tile, sides that need
    at most about ``max_tiles`` tiles per axis (any overlap, however large, still comes up)."""
    tile = 8 * draw(st.integers(1, 16))
    overlap = draw(st.integers(0, tile - 1))
    longest = tile + (max_tiles - 1) * (tile - overlap)
    return draw(st.integers(1, longest)), draw(st.integers(1, longest)), tile, overlap


def coverage(width: int, height: int, plan: list[Box]) -> np.ndarray:
    count = np.zeros((height, width), np.int32)
    for b in plan:
        count[b.y : b.bottom, b.x : b.right] += 1
    return count


# --- planning ------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(layouts(max_tiles=40))
def test_plan_covers_every_pixel_inside_the_image_with_tile_sized_tiles(layout: tuple[int, int, int, int]) -> None:
    width, height, tile, overlap = layout
    plan = plan_tiles(width, height, tile, overlap)
    assert len(set(plan)) == len(plan)
    image = Box(0, 0, width, height)
    assert all(image.contains(b) and not b.is_empty for b in plan)
    for length, spans in ((width, plan_axis(width, tile, overlap)), (height, plan_axis(height, tile, overlap))):
        assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == length  # no gap at either border
        for (a, n), (b, _) in pairwise(spans):
            assert a < b and b - a <= n - overlap  # no gap, and at least `overlap` shared
        sizes = {n for _, n in spans}
        # shift inward, never shrink: tiles are `tile` long whenever the axis allows it
        assert sizes == ({tile} if length >= tile else {length})
        if length >= tile or length % 8 == 0:
            assert all(n % 8 == 0 for n in sizes)
        if len(spans) > 1:  # the fewest tiles: one less could not cover the axis with the overlap
            fewer = len(spans) - 1
            assert fewer * tile - (fewer - 1) * overlap < length
    assert len(plan) == len(plan_axis(width, tile, overlap)) * len(plan_axis(height, tile, overlap))


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_every_pixel_is_covered(layout: tuple[int, int, int, int]) -> None:
    width, height, tile, overlap = layout
    assert coverage(width, height, plan_tiles(width, height, tile, overlap)).min() >= 1


def test_a_4k_painting_in_1024_tiles() -> None:
    plan = plan_tiles(3840, 2160, 1024, 128)
    assert len(plan) == 5 * 3
    assert {(b.width, b.height) for b in plan} == {(1024, 1024)}
    assert [b.x for b in plan[:5]] == [0, 704, 1408, 2112, 2816]
    assert [b.y for b in plan[::5]] == [0, 568, 1136]
    assert plan_tiles(1000, 700, 1024, 128) == [Box(0, 0, 1000, 700)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile": 100}, "multiple of 8"),
        ({"tile": 0}, "multiple of 8"),
        ({"overlap": 1024}, "below the tile size"),
        ({"overlap": -1}, "below the tile size"),
        ({"threshold": 1000}, "at least one tile"),
        ({"threshold": -5}, r"0 \(off\)"),
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TilingConfig(**kwargs)


def test_config_applies_above_the_threshold_and_zero_turns_it_off() -> None:
    config = TilingConfig()
    assert not config.applies(2048, 2048) and config.applies(2048, 2049) and config.applies(3840, 2160)
    assert not TilingConfig(threshold=0).applies(16384, 16384)


# --- blending ------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_blend_weights_sum_to_one_everywhere(layout: tuple[int, int, int, int]) -> None:
    width, height, tile, overlap = layout
    plan = plan_tiles(width, height, tile, overlap)
    weights = TileWeights(plan)
    total = np.zeros((height, width), np.float64)
    for b in plan:
        w = weights(b)
        assert w.shape == (b.height, b.width) and w.dtype == np.float32
        assert np.all(w > 0) and np.all(w <= 1.0 + 1e-6)  # every tile counts wherever it lies
        total[b.y : b.bottom, b.x : b.right] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(layouts(), st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 3]))
def test_tiling_an_identity_returns_the_input(layout: tuple[int, int, int, int], seed: int, channels: int) -> None:
    width, height, tile, overlap = layout
    shape = (height, width) if channels == 0 else (height, width, channels)
    values = np.random.default_rng(seed).random(shape, dtype=np.float32)
    plan = plan_tiles(width, height, tile, overlap)
    seen: list[int] = []

    def identity(index: int, box: Box, part: np.ndarray) -> np.ndarray:
        seen.append(index)
        assert part.shape[:2] == (box.height, box.width)
        return part.copy()

    out = map_tiles(values, plan, identity)
    assert seen == list(range(len(plan)))
    np.testing.assert_allclose(out, values, rtol=0, atol=2e-6)
    constant = map_tiles(np.full(shape, 0.7, np.float32), plan, lambda i, b, p: p)
    np.testing.assert_allclose(constant, 0.7, rtol=0, atol=1e-6)


def test_blending_is_a_smooth_ramp_across_the_overlap() -> None:
    plan = plan_tiles(112, 64, 64, 16)  # two tiles side by side sharing columns 48..63
    assert plan == [Box(0, 0, 64, 64), Box(48, 0, 64, 64)]
    left = blend_weights(plan[0], plan)[0]
    right = blend_weights(plan[1], plan)[0]
    assert np.all(left[:48] == 1.0) and np.all(right[16:] == 1.0)
    ramp = left[48:]
    assert np.all(np.diff(ramp) < 0) and 0 < ramp[-1] < 0.01 and 0.99 < ramp[0] < 1
    np.testing.assert_allclose(ramp + right[:16], 1.0, atol=1e-6)
    # a step of 1 between the halves comes out as a smooth blend, no jump larger than the ramp's
    out = map_tiles(np.zeros((64, 112), np.float32), plan, lambda i, b, p: p + i)
    assert np.abs(np.diff(out[0])).max() < 0.1


def test_any_plan_blends_to_one_not_only_grids() -> None:
    plan = [Box(0, 0, 64, 64), Box(48, 0, 64, 64), Box(0, 40, 112, 40), Box(100, 70, 12, 10)]
    total = np.zeros((80, 112))
    for b in plan:
        total[b.y : b.bottom, b.x : b.right] += blend_weights(b, plan)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    grid = plan_tiles(150, 97, 64, 16)
    per_pixel = TileWeights(grid)
    per_pixel._axes = None  # the path of non-grid plans: must agree with the per-axis one
    for b in grid:
        np.testing.assert_allclose(per_pixel(b), blend_weights(b, grid), atol=1e-6)


def test_blend_weights_refuses_a_tile_outside_the_plan() -> None:
    with pytest.raises(ValueError, match="not part of the plan"):
        blend_weights(Box(0, 0, 8, 8), plan_tiles(64, 64, 32, 8))


# --- the engine hook without a model ----------------------------------------------------------------


class IdentityTiles:
    """An engine whose whole-image refine returns its input; records the sub-requests."""

    def __init__(self, tiling: TilingConfig | None) -> None:
        self.tiling = tiling
        self.requests: list[RefineRequest] = []

    def refine(self, req: RefineRequest, on_progress: Any, should_stop: Any) -> Image:
        tiled = refine_if_large(self, req, on_progress, should_stop)
        if tiled is not None:
            return tiled
        self.requests.append(req)
        for step in range(1, req.plan.denoise_steps + 1):
            on_progress(step, req.plan.denoise_steps, None)
        return req.image


@pytest.mark.parametrize(
    ("order", "depth", "sample"), [("BGRA", 8, "uint"), ("RGBA", 16, "uint"), ("RGB", 32, "float")]
)
def test_tiled_identity_engine_returns_the_input_bytes(order: str, depth: int, sample: str) -> None:
    engine = IdentityTiles(TilingConfig(threshold=64 * 64, tile=64, overlap=16))
    image = make_image(150, 97, order, depth, sample)
    calls: list[tuple[int, int]] = []
    out = engine.refine(make_request(image), lambda s, t, p: calls.append((s, t)), lambda: False)
    assert out.spec == image.spec
    if sample == "uint":
        assert bytes(out.data) == bytes(image.data)
    else:  # float samples: equal within float rounding of the blend
        np.testing.assert_allclose(pixels.samples(out), pixels.samples(image), rtol=0, atol=1e-6)
    assert [(r.image.spec.width, r.image.spec.height) for r in engine.requests] == [
        (b.width, b.height) for b in plan_tiles(150, 97, 64, 16)
    ]
    assert {(r.image.spec.order, r.image.spec.sample) for r in engine.requests} == {("RGBA", "float")}  # lossless
    assert all(r.seed == 1 and r.work_size is None and r.mask is None for r in engine.requests)
    assert calls == [(i, 6 * 3) for i in range(1, 6 * 3 + 1)]


def test_tiled_identity_engine_gives_back_float_values_above_1() -> None:
    """A float document's highlights survive the tiled path (tone-mapped once for all tiles)."""
    engine = IdentityTiles(TilingConfig(threshold=64 * 64, tile=64, overlap=16))
    image = make_image(150, 97, "RGBA", 32, "float")
    values = pixels.samples(image).copy()
    values[20:60, 30:90, :3] *= 3.0  # up to 3.0
    image = Image(image.spec, values.tobytes())
    out = engine.refine(make_request(image), lambda *a: None, lambda: False)
    assert max(float(pixels.samples(r.image).max()) for r in engine.requests) <= 1.0  # the tiles are tone-mapped
    np.testing.assert_allclose(pixels.samples(out), values, rtol=1e-5, atol=1e-6)


def test_which_jobs_are_tiled() -> None:
    config = TilingConfig(threshold=64 * 64, tile=64, overlap=16)
    image = make_image(150, 97)
    cases = {
        None: 6,  # native, above the threshold
        (150, 97): 6,  # the native size asked for explicitly
        (64, 48): 0,  # the job asked for a smaller work size: run scaled, whole
        (200, 130): len(plan_tiles(200, 130, 64, 16)),  # a larger work size: tiled at that size
    }
    for work, tiles in cases.items():
        engine = IdentityTiles(config)
        out = engine.refine(make_request(image, work_size=work), lambda *a: None, lambda: False)
        assert out.spec == image.spec
        assert len(engine.requests) == (tiles or 1)
        if not tiles:
            assert engine.requests[0].image is image
    small = IdentityTiles(config)
    small.refine(make_request(make_image(64, 64)), lambda *a: None, lambda: False)
    assert len(small.requests) == 1  # exactly at the threshold: whole
    off = IdentityTiles(TilingConfig(threshold=0, tile=64, overlap=16))
    off.refine(make_request(image), lambda *a: None, lambda: False)
    assert len(off.requests) == 1


def test_tiled_mask_and_linear_transfer_follow_the_output_rule() -> None:
    engine = IdentityTiles(TilingConfig(threshold=64 * 64, tile=64, overlap=16))
    image = make_image(150, 97, "RGBA", 16, "uint")
    mask = np.zeros((97, 150), np.uint8)
    mask[10:90, 20:130] = 255
    req = make_request(image, mask=Image(ImageSpec(150, 97, "L"), mask.tobytes()), feather=6.0, transfer="linear")
    out = engine.refine(req, lambda *a: None, lambda: False)
    assert len(engine.requests) == 6  # the mask reaches into every tile
    for sub, box in zip(engine.requests, plan_tiles(150, 97, 64, 16), strict=True):
        assert sub.mask is not None and sub.feather == 0.0 and sub.transfer == "srgb"
        sub_mask = pixels.mask_to_float(sub.mask)
        assert np.array_equal(sub_mask, mask[box.y : box.bottom, box.x : box.right] / np.float32(255))
    alpha_in = pixels.samples(image)[..., 3]
    alpha_out = pixels.samples(out)[..., 3]
    assert np.all(alpha_out[mask == 0] == 0)
    assert np.array_equal(alpha_out[20:80, 30:120], alpha_in[20:80, 30:120])
    colour_in = pixels.samples(image)[..., :3].astype(np.int64)
    colour_out = pixels.samples(out)[..., :3].astype(np.int64)
    assert np.array_equal(colour_out[mask == 0], colour_in[mask == 0])  # exactly the input outside
    assert np.abs(colour_out - colour_in).max() <= 2  # sRGB round trip of 16-bit samples inside


def test_tiles_outside_the_mask_are_not_refined() -> None:
    engine = IdentityTiles(TilingConfig(threshold=64 * 64, tile=64, overlap=16))
    image = make_image(150, 97, "RGB")
    mask = np.zeros((97, 150), np.uint8)
    mask[5:20, 5:30] = 255  # only in the top-left tile
    calls: list[tuple[int, int]] = []
    req = make_request(image, mask=Image(ImageSpec(150, 97, "L"), mask.tobytes()))
    out = engine.refine(req, lambda s, t, p: calls.append((s, t)), lambda: False)
    assert [(r.image.spec.width, r.image.spec.height) for r in engine.requests] == [(64, 64)]
    assert calls == [(1, 3), (2, 3), (3, 3)]  # progress counts the refined tiles only
    assert bytes(out.data) == bytes(image.data)
    unkept = IdentityTiles(engine.tiling)
    unkept.refine(replace(req, keep_unmasked=False), lambda *a: None, lambda: False)
    assert len(unkept.requests) == 1 and unkept.requests[0].mask is None  # the engine's other mask rule


# --- the real pipeline (tiny demo model) --------------------------------------------------------


@pytest.fixture(scope="module")
def engine(demo_models: Any) -> Engine:
    loaded = Engine.load(demo=True, device="cpu", cache_dir=demo_models.refiner.parent.parent)
    loaded.tiling = TilingConfig(threshold=64 * 64, tile=64, overlap=16)  # type: ignore[attr-defined]
    return loaded


def test_tiled_refine_on_the_demo_model(engine: Engine) -> None:
    image = make_image(150, 97, "BGRA", 8, "uint")
    req = make_request(image, steps=5, strength=0.4, preview=True)
    plan = plan_tiles(150, 97, 64, 16)
    encoded: list[tuple[int, ...]] = []
    unet_calls: list[int] = []
    hooks = [
        engine.pipe.vae.encoder.register_forward_hook(lambda m, args, out: encoded.append(tuple(args[0].shape))),
        engine.pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1)),
    ]
    calls: list[tuple[int, int, Image | None]] = []
    try:
        out = engine.refine(req, lambda s, t, p: calls.append((s, t, p)), lambda: False)
    finally:
        for hook in hooks:
            hook.remove()
    steps = req.plan.denoise_steps
    assert len(plan) == 6 and steps == 2
    assert out.spec == image.spec and len(out.data) == image.spec.byte_length
    assert encoded == [(1, 3, 64, 64)] * len(plan)  # one VAE encode per planned tile, at tile size
    assert len(unet_calls) == len(plan) * steps
    assert [(s, t) for s, t, _ in calls] == [(i, len(plan) * steps) for i in range(1, len(plan) * steps + 1)]
    assert all(p is not None and (p.spec.width, p.spec.height) == (8, 8) for _, _, p in calls)  # the tile's
    before, after = pixels.samples(image), pixels.samples(out)
    assert np.array_equal(after[..., 3], before[..., 3])  # alpha intact
    assert np.abs(after[..., :3].astype(float) - before[..., :3]).mean() > 2.0  # the model changed it


def test_cancel_during_the_second_tile_stops_within_one_step(engine: Engine) -> None:
    req = make_request(make_image(150, 97), steps=5, strength=0.4)
    steps = req.plan.denoise_steps
    unet_calls: list[int] = []
    hook = engine.pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    calls: list[int] = []
    try:
        with pytest.raises(JobCancelled):
            engine.refine(req, lambda s, t, p: calls.append(s), lambda: len(calls) >= steps + 1)
    finally:
        hook.remove()
    assert calls == list(range(1, steps + 2))  # the first step of tile 2 was the last
    assert len(unet_calls) == steps + 1


def test_an_engine_without_a_config_tiles_above_2048x2048_in_1024_tiles() -> None:
    image = make_image(64, 64)
    at_threshold = IdentityTiles(None)
    at_threshold.refine(make_request(image, work_size=(2048, 2048)), lambda *a: None, lambda: False)
    assert len(at_threshold.requests) == 1
    above = IdentityTiles(None)
    out = above.refine(make_request(image, work_size=(2056, 2048)), lambda *a: None, lambda: False)
    assert out.spec == image.spec
    sizes = [(r.image.spec.width, r.image.spec.height) for r in above.requests]
    assert sizes == [(1024, 1024)] * 9


def test_tiled_masked_refine_keeps_the_outside_on_the_demo_model(engine: Engine) -> None:
    image = make_image(150, 97, "RGB", 8, "uint")
    mask = np.zeros((97, 150), np.uint8)
    mask[10:50, 10:40] = 255  # in the two left tiles of the top row's column: (0, 0) and (0, 33)
    req = make_request(image, steps=5, strength=0.4, mask=Image(ImageSpec(150, 97, "L"), mask.tobytes()))
    calls: list[tuple[int, int]] = []
    out = engine.refine(req, lambda s, t, p: calls.append((s, t)), lambda: False)
    assert calls == [(i, 4) for i in range(1, 5)]  # 2 of the 6 tiles, 2 steps each
    before, after = pixels.samples(image).astype(int), pixels.samples(out).astype(int)
    assert np.array_equal(after[mask == 0], before[mask == 0])
    assert np.abs(after[15:45, 15:35] - before[15:45, 15:35]).mean() > 2.0


# --- settings ------------------------------------------------------------------------------------


def test_cli_flags_reach_the_tiling_config(capsys: Any) -> None:
    from krita_sdxl.backend.cli.main import _settings, _tiling, build_parser, main

    args = build_parser().parse_args(["serve", "--tile-threshold", "1024x1024", "--tile-size", "512"])
    assert _tiling(_settings(args)) == TilingConfig(threshold=1024 * 1024, tile=512, overlap=128)
    defaults = _tiling(_settings(build_parser().parse_args(["serve", "--config", "/dev/null"])))
    assert defaults == TilingConfig(threshold=2048 * 2048, tile=1024, overlap=128)
    # refused before any model loads: a clear message and exit status 2
    assert main(["serve", "--config", "/dev/null", "--tile-size", "100"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tile-threshold", "big"])


class MarkOnce:
    """Stands in for the invisible watermark: records what it was applied to."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        self.shapes.append(rgb.shape)
        return rgb


def test_the_watermark_is_applied_once_to_the_blended_image_not_per_tile() -> None:
    engine = IdentityTiles(TilingConfig(threshold=64 * 64, tile=64, overlap=16))
    engine.watermark = MarkOnce()  # type: ignore[attr-defined]
    engine.refine(make_request(make_image(150, 97)), lambda *a: None, lambda: False)
    assert len(engine.requests) == len(plan_tiles(150, 97, 64, 16)) > 1
    assert engine.watermark.shapes == [(97, 150, 3)]  # type: ignore[attr-defined]


def test_the_demo_engine_marks_tiles_only_once(engine: Engine) -> None:
    marks = MarkOnce()
    saved, saved_tiling = engine.watermark, getattr(engine, "tiling", None)
    engine.watermark, engine.tiling = marks, TilingConfig(threshold=64 * 64, tile=64, overlap=16)
    try:
        engine.refine(make_request(make_image(150, 97), steps=2, strength=0.5), lambda *a: None, lambda: False)
    finally:
        engine.watermark, engine.tiling = saved, saved_tiling
    assert marks.shapes == [(97, 150, 3)]
