"""Crop, work-size and feather policy (krita_sdxl.protocol.geometry)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from krita_sdxl.protocol.geometry import (
    MAX_WORK_SIDE,
    MIN_PADDING,
    MIN_WORK_SIDE,
    Box,
    Extent,
    crop_for_selection,
    feather_radius,
    padding_for,
    snap_nearest,
    snap_up,
    work_size,
)

# --- value types ---------------------------------------------------------------------------------


def test_box_unpacks_in_pixeldata_order():
    x, y, w, h = Box(1, 2, 3, 4)
    assert (x, y, w, h) == (1, 2, 3, 4)
    assert Box(1, 2, 3, 4).right == 4 and Box(1, 2, 3, 4).bottom == 6
    assert Box(1, 2, 3, 4).extent == Extent(3, 4)
    assert tuple(Extent(5, 6)) == (5, 6)


def test_negative_sizes_are_rejected():
    with pytest.raises(ValueError):
        Box(0, 0, -1, 5)
    with pytest.raises(ValueError):
        Extent(3, -2)


def test_intersect_and_clamp():
    assert Box(-10, -10, 30, 30).clamp(Extent(15, 100)) == Box(0, 0, 15, 20)
    assert Box(50, 50, 10, 10).clamp(Extent(20, 20)).is_empty
    assert Box(0, 0, 10, 10).intersect(Box(5, 5, 10, 10)) == Box(5, 5, 5, 5)
    assert Box(5, 5, 2, 2).relative_to(Box(3, 4, 10, 10)) == Box(2, 1, 2, 2)
    assert Box(0, 0, 10, 10).contains(Box(2, 2, 8, 8))
    assert not Box(0, 0, 10, 10).contains(Box(2, 2, 9, 8))


def test_snapping_helpers():
    assert [snap_up(v) for v in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
    assert [snap_nearest(v) for v in (0, 3.9, 4, 11.9, 12, 1000)] == [8, 8, 8, 8, 16, 1000]


# --- crop_for_selection --------------------------------------------------------------------------


def test_crop_pads_by_six_percent_of_the_diagonal_and_snaps_to_8():
    sel = Box(1000, 1000, 600, 800)  # diagonal 1000 -> 60 px padding
    crop = crop_for_selection(sel, Extent(4000, 4000))
    assert padding_for(sel) == 60
    assert crop.contains(sel)
    # 720 x 920 after padding: already multiples of 8, so exactly the padded box
    assert crop == Box(940, 940, 720, 920)


def test_small_selection_gets_the_minimum_padding():
    sel = Box(100, 100, 10, 10)
    assert padding_for(sel) == MIN_PADDING
    crop = crop_for_selection(sel, Extent(1000, 1000))
    assert crop.contains(Box(100 - MIN_PADDING, 100 - MIN_PADDING, 10 + 2 * MIN_PADDING, 10 + 2 * MIN_PADDING))
    assert crop.width % 8 == 0 and crop.height % 8 == 0
    assert crop.width == 48  # 42 snapped up


def test_crop_is_clamped_at_the_canvas_edges():
    canvas = Extent(500, 300)
    crop = crop_for_selection(Box(0, 0, 100, 100), canvas)
    assert crop.x == 0 and crop.y == 0
    crop = crop_for_selection(Box(450, 250, 50, 50), canvas)
    assert crop.right == 500 and crop.bottom == 300
    assert crop.width % 8 == 0 and crop.height % 8 == 0  # grown to the left/top instead


def test_selection_partly_outside_the_canvas_is_clamped_first():
    crop = crop_for_selection(Box(-50, -50, 100, 100), Extent(200, 200))
    assert crop.x == 0 and crop.y == 0
    assert Box.from_extent(Extent(200, 200)).contains(crop)


def test_canvas_narrower_than_the_next_multiple_is_used_whole():
    crop = crop_for_selection(Box(2, 2, 10, 10), Extent(13, 21))
    assert crop == Box(0, 0, 13, 21)


def test_explicit_padding_overrides_the_fraction():
    assert crop_for_selection(Box(100, 100, 64, 64), Extent(1000, 1000), padding=0) == Box(100, 100, 64, 64)
    assert crop_for_selection(Box(100, 100, 64, 64), Extent(1000, 1000), padding=8) == Box(92, 92, 80, 80)


def test_selection_outside_the_canvas_raises():
    with pytest.raises(ValueError, match="does not overlap"):
        crop_for_selection(Box(300, 300, 10, 10), Extent(200, 200))


canvases = st.builds(Extent, st.integers(1, 5000), st.integers(1, 5000))


@st.composite
def selections_on_canvas(draw):
    canvas = draw(canvases)
    x = draw(st.integers(-200, canvas.width - 1))
    y = draw(st.integers(-200, canvas.height - 1))
    w = draw(st.integers(1, canvas.width + 400))
    h = draw(st.integers(1, canvas.height + 400))
    sel = Box(x, y, w, h)
    if sel.clamp(canvas).is_empty:
        sel = Box(max(0, x), max(0, y), w, h)
    return canvas, sel


@given(selections_on_canvas(), st.floats(0, 0.5), st.integers(0, 64))
def test_crop_properties(case, fraction, min_padding):
    canvas, sel = case
    crop = crop_for_selection(sel, canvas, padding_fraction=fraction, min_padding=min_padding)
    inside = sel.clamp(canvas)
    assert Box.from_extent(canvas).contains(crop), "inside the canvas"
    assert crop.contains(inside), "contains the selection"
    pad = padding_for(inside, fraction, min_padding)
    wanted = Box.from_edges(inside.x - pad, inside.y - pad, inside.right + pad, inside.bottom + pad).clamp(canvas)
    assert crop.contains(wanted), "contains the padded selection"
    for size, limit in ((crop.width, canvas.width), (crop.height, canvas.height)):
        if limit >= snap_up(size):
            assert size % 8 == 0, "a multiple of 8 whenever the canvas allows"
        else:
            assert size == limit, "the whole canvas side otherwise"
    assert crop.width - wanted.width < 8 and crop.height - wanted.height < 8, "grown by less than one step"


# --- work_size -----------------------------------------------------------------------------------


def test_square_work_size_is_one_megapixel():
    assert work_size(Extent(4096, 4096)) == Extent(1024, 1024)
    assert work_size(Extent(300, 300)) == Extent(1024, 1024)  # selections are scaled up


def test_aspect_is_kept():
    w = work_size(Extent(3000, 2000))
    assert w.width % 8 == 0 and w.height % 8 == 0
    assert abs(w.width / w.height - 1.5) < 0.02
    assert abs(w.pixel_count - 1024 * 1024) / (1024 * 1024) < 0.02


def test_whole_layers_keep_native_size_up_to_one_megapixel():
    assert work_size(Extent(800, 600), upscale=False) == Extent(800, 600)
    assert work_size(Extent(1001, 703), upscale=False) == Extent(1000, 704)
    big = work_size(Extent(4000, 3000), upscale=False)
    assert big.pixel_count <= 1.03 * 1024 * 1024
    assert abs(big.width / big.height - 4 / 3) < 0.02


def test_tiny_whole_layer_is_raised_to_the_minimum_side():
    assert work_size(Extent(100, 50), upscale=False) == Extent(1024, 512)


def test_elongated_areas_are_capped_at_the_maximum_side():
    w = work_size(Extent(10000, 500))
    assert w.width == MAX_WORK_SIDE
    assert w.height == 104  # 2048 / 20 = 102.4 -> 104
    w = work_size(Extent(3, 40000))
    assert w.height == MAX_WORK_SIDE and w.width == 8


def test_work_size_rejects_empty_and_bad_limits():
    with pytest.raises(ValueError):
        work_size(Extent(0, 10))
    with pytest.raises(ValueError):
        work_size(Extent(10, 10), min_side=2000, max_side=1000)


@given(st.integers(1, 20000), st.integers(1, 20000), st.booleans())
def test_work_size_properties(width, height, upscale):
    extent = Extent(width, height)
    w = work_size(extent, upscale=upscale)
    assert w.width % 8 == 0 and w.height % 8 == 0
    assert 8 <= w.width <= MAX_WORK_SIDE and 8 <= w.height <= MAX_WORK_SIDE
    assert w.pixel_count <= max(1024 * 1024, MIN_WORK_SIDE * MAX_WORK_SIDE) * 1.05
    ratio = width / height
    if min(w.width, w.height) >= 80:  # snapping moves each side by at most 4 px
        assert math.isclose(w.width / w.height, ratio, rel_tol=0.1)
    if not upscale and extent.pixel_count <= 1024 * 1024 and extent.shortest_side >= MIN_WORK_SIDE:
        assert abs(w.width - width) <= 4 and abs(w.height - height) <= 4


# --- feather_radius ------------------------------------------------------------------------------


def test_feather_is_ten_percent_of_the_diagonal_times_strength():
    sel = Box(0, 0, 600, 800)  # diagonal 1000
    assert feather_radius(sel, 1.0) == pytest.approx(100)
    assert feather_radius(sel, 0.3) == pytest.approx(30)
    assert feather_radius(sel, 0.3, fraction=0.05) == pytest.approx(15)


def test_feather_is_capped_for_narrow_selections_and_zero_when_off():
    assert feather_radius(Box(0, 0, 40, 1000), 1.0) == pytest.approx(10)
    assert feather_radius(Box(0, 0, 100, 100), 0.0) == 0.0
    assert feather_radius(Box(0, 0, 100, 100), 0.5, fraction=0) == 0.0
    assert feather_radius(Extent(0, 0), 1.0) == 0.0


@given(st.integers(1, 8000), st.integers(1, 8000), st.floats(0.01, 1.0))
def test_feather_properties(w, h, strength):
    r = feather_radius(Extent(w, h), strength)
    assert 0 <= r <= min(w, h) / 4 + 1e-9
    assert r <= feather_radius(Extent(w, h), 1.0) + 1e-9
