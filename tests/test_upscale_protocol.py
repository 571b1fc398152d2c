"""Upscale jobs on the wire (``submit.upscale``), the service's limit on the result, and the sizes the CLI
and the docker turn a factor or a target size into. Pure: no model, no socket."""

from __future__ import annotations

import argparse

import pytest

from krita_sdxl.backend.cli.upscale_flags import parse_factor, parse_size, upscale_field
from krita_sdxl.backend.common.config import ConfigError
from krita_sdxl.backend.service.limits import Limits
from krita_sdxl.backend.service.server import check_upscale
from krita_sdxl.protocol import CLIENT, Image, ImageSpec, ProtocolError, decode, encode
from krita_sdxl.protocol.upscale import UpscaleSpec, factor_text, fit_size, largest_factor, scaled_size

IMAGE = Image(ImageSpec(512, 384, "BGRA", 8), bytes(512 * 384 * 4))
MASK = Image(ImageSpec(512, 384, "L", 8), bytes(512 * 384))


def submit(**fields):
    images = {"image": IMAGE, **({"mask": fields.pop("mask")} if "mask" in fields else {})}
    return decode(CLIENT, encode(CLIENT, "submit", images=images, job="j", **fields))


def test_a_submit_carries_the_result_size_and_strength_0_with_it():
    msg = submit(upscale={"width": 1024, "height": 768}, strength=0.0)
    assert msg["upscale"] == UpscaleSpec(1024, 768, "auto") and msg["strength"] == 0.0
    assert submit()["upscale"] is None  # optional: a refine as before
    assert submit(upscale={"width": 1024, "height": 768, "method": "lanczos"})["upscale"].method == "lanczos"


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ([1024, 768], "upscale"),
        ({"width": 1024}, "upscale.height"),
        ({"width": 0, "height": 768}, "upscale.width"),
        ({"width": 16385, "height": 768}, "upscale.width"),
        ({"width": 1024.0, "height": 768}, "upscale.width"),
        ({"width": True, "height": 768}, "upscale.width"),
        ({"width": 1024, "height": 768, "factor": 2}, "upscale.factor"),
        ({"width": 1024, "height": 768, "method": "bicubic"}, "upscale.method"),
        ({"width": 1024, "height": 768, "x" * 10_000: 1}, "upscale." + "x" * 10_000),
    ],
)
def test_a_bad_upscale_field_is_named(value, field):
    with pytest.raises(ProtocolError) as err:
        submit(upscale=value)
    assert err.value.field == field and len(err.value.message) < 300, err.value


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"strength": 0.0}, "strength", "only for an upscale"),
        ({"strength": -0.1, "upscale": {"width": 1024, "height": 768}}, "strength", ">= 0.0"),
        ({"upscale": {"width": 1024, "height": 768}, "mask": MASK}, "mask", "no mask"),
        ({"upscale": {"width": 1024, "height": 768}, "work_width": 512, "work_height": 384}, "work_width", "work size"),
        ({"upscale": {"width": 1024, "height": 768}, "mode": "generate"}, "mode", "refine only"),
        ({"upscale": {"width": 1024, "height": 300}}, "upscale.height", "only enlarges"),
    ],
)
def test_the_rules_across_fields(fields, field, words):
    with pytest.raises(ProtocolError) as err:
        submit(**fields)
    assert err.value.field == field and words in err.value.message, err.value


def test_sizes_from_a_factor_or_a_box():
    assert scaled_size(512, 384, 2) == (1024, 768)
    assert scaled_size(333, 222, 1.5) == (500, 333)  # 499.5 rounds up
    assert fit_size(1024, 768, 4096, 3072) == (4096, 3072)
    assert fit_size(1000, 1000, 4096, 3072) == (3072, 3072)  # fits inside, keeps the aspect
    assert fit_size(1000, 500, 3000, None) == (3000, 1500)
    assert fit_size(1000, 500, None, 3000) == (6000, 3000)
    assert fit_size(999, 701, 2000, 2000) == (2000, 1403)
    with pytest.raises(ValueError):
        fit_size(1000, 1000, 500, 500)
    with pytest.raises(ValueError):
        scaled_size(10, 10, 0.5)
    assert factor_text(2.0) == "2x" and factor_text(1.5) == "1.5x" and factor_text(2.83) == "2.83x"


@pytest.mark.parametrize(
    ("w", "h", "most"), [(512, 384, 1024 * 1024), (333, 777, 8192 * 8192), (1, 1, 4096), (4000, 10, 10**6)]
)
def test_the_largest_factor_fits_and_one_hundredth_more_gives_nothing_larger_that_fits(w, h, most):
    best = largest_factor(w, h, most)
    assert best is not None
    bw, bh = scaled_size(w, h, best)
    assert bw * bh <= most and max(bw, bh) <= 16384
    nw, nh = scaled_size(w, h, round(best + 0.01, 2))
    assert nw * nh > most or max(nw, nh) > 16384 or (nw, nh) == (bw, bh)
    assert largest_factor(2000, 2000, 1000 * 1000) is None  # the image alone is too large


def test_the_service_limit_applies_to_the_result_and_names_the_largest_factor():
    limits = Limits(max_pixels=1024 * 1024)
    limits.check_submit(submit(upscale={"width": 1024, "height": 768}))  # 786,432 pixels: fits
    with pytest.raises(ProtocolError) as err:
        limits.check_submit(submit(upscale={"width": 2048, "height": 1536}))
    e = err.value
    assert e.code == "limit" and e.field == "upscale" and e.job == "j"
    assert "2048x1536 = 3145728 pixels" in e.message and "largest factor that fits is 2.3x (1178x883" in e.message, e


def test_a_service_that_cannot_upscale_or_has_no_upscaler_model_says_so():
    msg = submit(upscale={"width": 1024, "height": 768, "method": "model"})
    with pytest.raises(ProtocolError) as err:
        check_upscale(msg, {"modes": ["refine"]})  # an older or identity backend: no upscale capability
    assert err.value.code == "unsupported" and "cannot upscale" in err.value.message
    with pytest.raises(ProtocolError) as err:
        check_upscale(msg, {"upscale": {"methods": ["auto", "lanczos"], "model": None}})
    assert err.value.field == "upscale.method" and "--upscaler FILE" in err.value.message
    check_upscale(msg, {"upscale": {"methods": ["auto", "lanczos", "model"]}})


@pytest.mark.parametrize(("text", "factor"), [("2", 2.0), ("2x", 2.0), ("x2", 2.0), ("2X", 2.0), ("1.5", 1.5),
                                              ("200%", 2.0), (" 3 ", 3.0), ("4×", 4.0)])  # fmt: skip
def test_factors_as_people_type_them(text, factor):
    assert parse_factor(text) == factor


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096x3072", (4096, 3072)), ("4096X3072", (4096, 3072)), ("4096*3072", (4096, 3072)),
     ("4096 x 3072", (4096, 3072)), ("4096x", (4096, None)), ("x3072", (None, 3072)), ("4096", (4096, None)),
     ("4096x3072px", (4096, 3072))],
)  # fmt: skip
def test_sizes_as_people_type_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"upscale": "0.5"}, "only enlarges"),
        ({"upscale": "two"}, "a factor such as 2"),
        ({"upscale": "-2"}, "a factor such as 2"),
        ({"upscale": "nan"}, "a factor such as 2"),
        ({"upscale_to": "big"}, "must look like 4096x3072"),
        ({"upscale_to": "0x100"}, "a side of 0 pixels"),
        ({"upscale_to": "100x100"}, "smaller than in.png (512x384)"),
        ({"upscale": "2", "upscale_to": "2048x"}, "not both"),
        ({"upscale_method": "lanczos"}, "only with --upscale"),
        ({"upscale": "40"}, "over 16384 pixels"),
    ],
)
def test_cli_mistakes_are_named_in_one_line(flags, words):
    args = argparse.Namespace(**{"upscale": None, "upscale_to": None, "upscale_method": None, **flags})
    with pytest.raises(ConfigError) as err:
        upscale_field(args, 512, 384, "in.png")
    assert words in str(err.value), err.value


def test_cli_fields():
    args = argparse.Namespace(upscale=None, upscale_to="4096x3072", upscale_method=None)
    assert upscale_field(args, 512, 384, "in.png") == {"upscale": {"width": 4096, "height": 3072, "method": "auto"}}
    args = argparse.Namespace(upscale="1.5x", upscale_to=None, upscale_method="lanczos")
    assert upscale_field(args, 512, 384, "in.png") == {"upscale": {"width": 768, "height": 576, "method": "lanczos"}}
    assert upscale_field(argparse.Namespace(upscale=None, upscale_to=None, upscale_method=None), 5, 5, "x") == {}
