"""The size-bucket policy of the speed path (pure, no torch)."""

from __future__ import annotations

import pytest

from krita_sdxl.backend.speed.buckets import DEFAULT_LADDER, DEFAULT_POLICY, UNET_MULTIPLE, BucketPolicy


def test_sides_round_up_to_the_next_rung() -> None:
    p = DEFAULT_POLICY
    assert p.side(1) == 256
    assert p.side(256) == 256
    assert p.side(257) == 384
    assert p.side(1000) == 1024
    assert p.side(1024) == 1024
    assert p.side(1300) == 1536
    assert p.side(2048) == 2048
    assert p.side(2049) == 2304  # beyond the ladder: multiples of 256


@pytest.mark.parametrize("n", range(1, 4200, 7))
def test_every_bucket_holds_the_image_and_suits_the_unet(n: int) -> None:
    side = DEFAULT_POLICY.side(n)
    assert side >= n
    assert side % UNET_MULTIPLE == 0
    assert side == 256 if n <= 256 else side - n < (128 if n <= 1280 else 256)


def test_bucket_is_per_axis() -> None:
    assert DEFAULT_POLICY.bucket(1000, 700) == (1024, 768)
    assert DEFAULT_POLICY.bucket(700, 1000) == (768, 1024)


def test_a_sweep_of_krita_selections_touches_few_buckets() -> None:
    # ten selection work sizes as the plugin makes them (about 1 MP, multiples of 8)
    sizes = [(1024, 1024), (1000, 1000), (960, 1016), (1016, 960), (896, 1152), (1152, 896),
             (1280, 816), (816, 1280), (1024, 1016), (1008, 1008)]  # fmt: skip
    shapes = DEFAULT_POLICY.shapes(sizes)
    assert len(shapes) <= 5
    assert all(DEFAULT_POLICY.waste(w, h) < 0.25 for w, h in sizes)


def test_typical_work_area_is_bounded() -> None:
    sides = range(640, 1281, 8)
    assert len({DEFAULT_POLICY.side(s) for s in sides}) == 6  # 640 768 896 1024 1152 1280
    assert len(DEFAULT_LADDER) ** 2 == 144


def test_waste() -> None:
    assert DEFAULT_POLICY.waste(1024, 1024) == 0.0
    assert 0.0 < DEFAULT_POLICY.waste(1030, 1024) < 0.12


@pytest.mark.parametrize(
    "kw",
    [dict(ladder=()), dict(ladder=(512, 256)), dict(ladder=(500,)), dict(beyond=100), dict(ladder=(256, 256))],
)
def test_bad_policies_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        BucketPolicy(**kw)


def test_bad_side() -> None:
    with pytest.raises(ValueError):
        DEFAULT_POLICY.side(0)
