"""Protocol codec and validation: pure, fast, no sockets."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from krita_sdxl.protocol import (
    CLIENT,
    FORMATS,
    ORDERS,
    SERVICE,
    Image,
    ImageSpec,
    ProtocolError,
    decode,
    encode,
    plan_img2img,
)
from krita_sdxl.protocol.policy import MAX_STEPS, MIN_STRENGTH, denoise_steps
from krita_sdxl.protocol.schema import CLIENT_MESSAGES, SERVICE_MESSAGES


def test_submit_round_trip_keeps_pixels_without_copy():
    pixels = bytearray(range(24))
    img = Image(ImageSpec(3, 2, "BGRA", 8), pixels)
    frames = encode(CLIENT, "submit", images={"image": img}, job="j1", prompt="hi", seed=7)
    assert frames[1] is pixels  # handed to zmq as-is (copy=False)
    msg = decode(CLIENT, frames)
    assert msg.type == "submit" and msg.job == "j1" and msg["seed"] == 7
    assert msg["strength"] == 0.3 and msg["steps"] == 50  # defaults filled in
    view = msg.images["image"].data
    assert isinstance(view, memoryview) and view.obj is pixels  # no copy on decode either


def test_header_is_msgpack_map_with_version_and_type():
    frames = encode(CLIENT, "hello", client="krita")
    header = msgpack.unpackb(frames[0])
    assert header == {"v": 1, "type": "hello", "client": "krita"}


@pytest.mark.parametrize(
    "header, extra, code, field",
    [
        (
            {"v": 1, "type": "submit", "job": "j", "strength": 0, "image": {"width": 1, "height": 1}},
            [b"1234"],
            "bad_field",
            "strength",
        ),
        (
            {"v": 1, "type": "submit", "job": "j", "strength": math.nan, "image": {"width": 1, "height": 1}},
            [b"1234"],
            "bad_field",
            "strength",
        ),
        (
            {"v": 1, "type": "submit", "job": "j", "steps": True, "image": {"width": 1, "height": 1}},
            [b"1234"],
            "bad_field",
            "steps",
        ),
        (
            {"v": 1, "type": "submit", "job": "j", "strenght": 0.3, "image": {"width": 1, "height": 1}},
            [b"1234"],
            "bad_field",
            "strenght",
        ),
        ({"v": 1, "type": "submit", "job": "", "image": {"width": 1, "height": 1}}, [b"1234"], "bad_field", "job"),
        ({"v": 1, "type": "submit", "image": {"width": 1, "height": 1}}, [b"1234"], "missing_field", "job"),
        ({"v": 1, "type": "submit", "job": "j"}, [], "missing_field", "image"),
        (
            {"v": 1, "type": "submit", "job": "j", "image": {"width": 1, "height": 1, "order": "ARGB"}},
            [b"1234"],
            "bad_field",
            "image.order",
        ),
        (
            {"v": 1, "type": "submit", "job": "j", "image": {"width": 1, "height": 1, "depth": 8, "sample": "float"}},
            [b"1234"],
            "bad_field",
            "image.depth",
        ),
        (
            {"v": 1, "type": "submit", "job": "j", "image": {"width": 1, "height": 1}},
            [b"1234", b"x"],
            "frame_mismatch",
            "image",
        ),
        (
            {"v": 1, "type": "submit", "job": "j", "prompt": "x" * 9000, "image": {"width": 1, "height": 1}},
            [b"1234"],
            "bad_field",
            "prompt",
        ),
        ({"v": 1, "type": "cancel", "job": 5}, [], "bad_field", "job"),
        ({"v": 1}, [], "missing_field", "type"),
        ({"v": "1", "type": "hello"}, [], "version_mismatch", "v"),
    ],
)
def test_validation_names_the_field(header, extra, code, field):
    with pytest.raises(ProtocolError) as info:
        decode(CLIENT, [msgpack.packb(header), *extra])
    assert (info.value.code, info.value.field) == (code, field)
    if isinstance(header.get("job"), str) and header["job"]:
        assert info.value.job == header["job"]  # errors are routed to the job when it is readable


def test_huge_header_is_refused_before_parsing():
    with pytest.raises(ProtocolError) as info:
        decode(CLIENT, [b"\x00" * (300 * 1024)])
    assert info.value.code == "bad_header"


def test_service_events_are_validated_on_the_client_side():
    with pytest.raises(ProtocolError):
        decode(SERVICE, [msgpack.packb({"v": 1, "type": "progress", "job": "j", "step": -1, "total": 4})])
    with pytest.raises(ProtocolError):  # a client message type is not a service event
        decode(SERVICE, encode(CLIENT, "submit", images={"image": Image(ImageSpec(1, 1), b"1234")}, job="j"))


def test_every_message_type_has_a_schema_and_known_field_kinds():
    for table in (CLIENT_MESSAGES, SERVICE_MESSAGES):
        for fields in table.values():
            for f in fields.values():
                assert f.kind in ("str", "int", "float", "bool", "map", "list", "image", "upscale")


@pytest.mark.parametrize("sample, depth", FORMATS)
@pytest.mark.parametrize("order", ORDERS)
def test_byte_length(order, sample, depth):
    spec = ImageSpec(5, 3, order, depth, sample)
    assert spec.byte_length == 5 * 3 * len(order) * depth // 8


def test_step_policy_matches_diffusers_and_never_gives_zero():
    assert plan_img2img(50, 0.3).denoise_steps == 15
    plan = plan_img2img(10, 0.05)
    assert plan.adjusted and plan.denoise_steps == 1 and plan.steps == 20
    assert not plan_img2img(10, 1.0).adjusted


@given(steps=st.integers(1, 500), strength=st.floats(0.001, 1.0))
def test_step_policy_property(steps, strength):
    if strength < MIN_STRENGTH:  # would need more than MAX_STEPS scheduler steps: refused, naming the field
        with pytest.raises(ProtocolError) as info:
            plan_img2img(steps, strength)
        assert (info.value.code, info.value.field) == ("bad_field", "strength")
        assert f"{MIN_STRENGTH:g}" in info.value.message
        return
    plan = plan_img2img(steps, strength)
    assert plan.denoise_steps == denoise_steps(plan.steps, strength) >= 1
    assert steps <= plan.steps <= MAX_STEPS
    assert plan.adjusted == (plan.steps != steps)
    if plan.adjusted:  # the smallest step count that gives one denoising step
        assert denoise_steps(plan.steps - 1, strength) == 0


_text = st.text(max_size=50)
_unit = st.floats(0.001, 1.0, allow_nan=False)


@st.composite
def images(draw, orders=ORDERS):
    w, h = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    sample, depth = draw(st.sampled_from(FORMATS))
    spec = ImageSpec(w, h, draw(st.sampled_from(orders)), depth, sample)
    return Image(spec, draw(st.binary(min_size=spec.byte_length, max_size=spec.byte_length)))


@settings(max_examples=200)
@given(
    img=images(),
    job=st.text(min_size=1, max_size=128),
    prompt=_text,
    strength=_unit,
    steps=st.integers(1, 500),
    seed=st.none() | st.integers(0, 2**64 - 1),
    preview=st.booleans(),
)
def test_submit_encode_decode_is_identity(img, job, prompt, strength, steps, seed, preview):
    fields = dict(job=job, prompt=prompt, strength=strength, steps=steps, seed=seed, preview=preview)
    msg = decode(CLIENT, encode(CLIENT, "submit", images={"image": img}, **fields))
    for key, value in fields.items():
        assert msg[key] == value
    assert msg["image"] == img.spec
    assert bytes(msg.images["image"].data) == bytes(img.data)


@settings(max_examples=100)
@given(
    job=st.text(min_size=1, max_size=128),
    step=st.integers(0, 10**6),
    total=st.integers(1, 10**6),
    preview=st.none() | images(orders=("RGBA",)),
)
def test_progress_encode_decode_is_identity(job, step, total, preview):
    images_ = {"preview": preview} if preview else None
    msg = decode(SERVICE, encode(SERVICE, "progress", images=images_, job=job, step=step, total=total))
    assert (msg.job, msg["step"], msg["total"]) == (job, step, total)
    if preview:
        assert bytes(msg.images["preview"].data) == bytes(preview.data)
    else:
        assert msg["preview"] is None and not msg.images


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        decode(CLIENT, [data])
    except ProtocolError:
        pass
