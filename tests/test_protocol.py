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
    MAX_CHUNK_BYTES,
    ORDERS,
    PROTOCOL_VERSION,
    SERVICE,
    WINDOW_BYTES,
    Image,
    ImageSpec,
    Incoming,
    Outgoing,
    ProtocolError,
    decode,
    encode,
    plan_img2img,
)
from krita_sdxl.protocol.codec import stream_buffers, stream_specs
from krita_sdxl.protocol.policy import MAX_STEPS, MIN_STRENGTH, denoise_steps
from krita_sdxl.protocol.schema import CLIENT_MESSAGES, SERVICE_MESSAGES


def test_submit_is_a_header_alone_and_its_pixels_a_stream_without_copy():
    pixels = bytearray(range(24))
    img = Image(ImageSpec(3, 2, "BGRA", 8), pixels)
    frames = encode(CLIENT, "submit", images={"image": img}, job="j1", prompt="hi", seed=7)
    assert len(frames) == 1  # the pixels follow in chunk messages
    msg = decode(CLIENT, frames)
    assert msg.type == "submit" and msg.job == "j1" and msg["seed"] == 7
    assert msg["strength"] == 0.3 and msg["steps"] == 50  # defaults filled in
    assert stream_specs(msg) == [("image", img.spec)] and not msg.images
    assert stream_buffers("submit", {"image": img})[0] is pixels  # handed to zmq as-is (copy=False)
    chunk = decode(CLIENT, encode(CLIENT, "chunk", payload=pixels, job="j1", offset=0))
    assert isinstance(chunk.payload, memoryview) and chunk.payload.obj is pixels  # no copy on decode either


def test_header_is_msgpack_map_with_version_and_type():
    frames = encode(CLIENT, "hello", client="krita")
    header = msgpack.unpackb(frames[0])
    assert header == {"v": PROTOCOL_VERSION, "type": "hello", "client": "krita"} and PROTOCOL_VERSION == 2


@pytest.mark.parametrize(
    "v, code",
    [(2.0, "version_mismatch"), (True, "version_mismatch"), (1, "version_mismatch"), ("2", "version_mismatch")],
)
def test_the_version_must_be_the_integer_2(v, code):
    """Issue 20, item 7: v = 1.0 or true was taken for 1 (True == 1 and 1.0 == 1 in Python)."""
    with pytest.raises(ProtocolError) as info:
        decode(CLIENT, [msgpack.packb({"v": v, "type": "hello"})])
    assert (info.value.code, info.value.field) == (code, "v")


def test_a_missing_version_is_a_missing_field():
    """Issue 20, item 7: it was version_mismatch ("None")."""
    with pytest.raises(ProtocolError) as info:
        decode(CLIENT, [msgpack.packb({"type": "hello"})])
    assert (info.value.code, info.value.field) == ("missing_field", "v")
    assert "None" not in info.value.message


def test_a_stream_goes_in_chunks_within_credit_and_arrives_whole():
    image = Image(ImageSpec(700, 700, "RGBA", 8), (bytes(range(256)) * 7700)[: 700 * 700 * 4])
    mask = Image(ImageSpec(700, 700, "L", 8), b"\x05" * (700 * 700))
    out = Outgoing("j", [image.data, mask.data])
    incoming = Incoming("j", [("image", image.spec), ("mask", mask.spec)])
    assert out.total == incoming.total == image.spec.byte_length + mask.spec.byte_length
    assert list(out.chunks()) == []  # nothing before the first credit
    sizes = []
    while not incoming.done:
        out.grant(incoming.received, incoming.until)
        for offset, data in out.chunks():
            assert data.nbytes <= MAX_CHUNK_BYTES and offset + data.nbytes <= incoming.received + WINDOW_BYTES
            incoming.put(offset, data, incoming.until)
            sizes.append(data.nbytes)
    got = incoming.images()
    assert bytes(got["image"].data) == bytes(image.data) and bytes(got["mask"].data) == bytes(mask.data)
    assert max(sizes) == MAX_CHUNK_BYTES  # a chunk that spans the image and the mask is joined


@pytest.mark.parametrize(
    "offset, size, until, code",
    [(1, 10, None, "frame_mismatch"), (0, 101, None, "frame_mismatch"), (0, 60, 50, "limit")],
    ids=["out of order", "past the end", "beyond credit"],
)
def test_a_chunk_out_of_order_or_beyond_its_credit_is_refused(offset, size, until, code):
    incoming = Incoming("j", [("image", ImageSpec(5, 5, "RGBA", 8))])
    with pytest.raises(ProtocolError) as info:
        incoming.put(offset, b"x" * size, until)
    assert (info.value.code, info.value.field, info.value.job) == (code, "offset", "j")
    assert incoming.received == 0


def test_a_chunk_is_one_frame_of_at_most_1_mib():
    head = msgpack.packb({"v": 2, "type": "chunk", "job": "j", "offset": 0})
    for frames in ([head], [head, b"x", b"y"], [head, b""], [head, b"x" * (MAX_CHUNK_BYTES + 1)]):
        with pytest.raises(ProtocolError) as info:
            decode(CLIENT, frames)
        assert info.value.code == "frame_mismatch"
    with pytest.raises(ProtocolError) as info:  # a submit's pixels never follow its header
        decode(
            CLIENT,
            [msgpack.packb({"v": 2, "type": "submit", "job": "j", "image": {"width": 1, "height": 1}}), b"x" * 4],
        )
    assert info.value.code == "frame_mismatch" and "chunk" in info.value.message


@pytest.mark.parametrize(
    "header, extra, code, field",
    [
        (
            {"v": 2, "type": "submit", "job": "j", "strength": 0, "image": {"width": 1, "height": 1}},
            [b"1234"],
            "bad_field",
            "strength",
        ),
        (
            {"v": 2, "type": "submit", "job": "j", "strength": math.nan, "image": {"width": 1, "height": 1}},
            [b"1234"],
            "bad_field",
            "strength",
        ),
        (
            {"v": 2, "type": "submit", "job": "j", "steps": True, "image": {"width": 1, "height": 1}},
            [b"1234"],
            "bad_field",
            "steps",
        ),
        (
            {"v": 2, "type": "submit", "job": "j", "strenght": 0.3, "image": {"width": 1, "height": 1}},
            [b"1234"],
            "bad_field",
            "strenght",
        ),
        ({"v": 2, "type": "submit", "job": "", "image": {"width": 1, "height": 1}}, [b"1234"], "bad_field", "job"),
        ({"v": 2, "type": "submit", "image": {"width": 1, "height": 1}}, [b"1234"], "missing_field", "job"),
        ({"v": 2, "type": "submit", "job": "j"}, [], "missing_field", "image"),
        (
            {"v": 2, "type": "submit", "job": "j", "image": {"width": 1, "height": 1, "order": "ARGB"}},
            [b"1234"],
            "bad_field",
            "image.order",
        ),
        (
            {"v": 2, "type": "submit", "job": "j", "image": {"width": 1, "height": 1, "depth": 8, "sample": "float"}},
            [b"1234"],
            "bad_field",
            "image.depth",
        ),
        (
            {"v": 2, "type": "submit", "job": "j", "image": {"width": 1, "height": 1}},
            [b"1234"],
            "frame_mismatch",
            None,
        ),
        (
            {"v": 2, "type": "submit", "job": "j", "prompt": "x" * 4001, "image": {"width": 1, "height": 1}},
            [b"1234"],
            "bad_field",
            "prompt",
        ),
        ({"v": 2, "type": "cancel", "job": 5}, [], "bad_field", "job"),
        ({"v": 2}, [], "missing_field", "type"),
        ({"v": "2", "type": "hello"}, [], "version_mismatch", "v"),
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
        decode(SERVICE, [msgpack.packb({"v": 2, "type": "progress", "job": "j", "step": -1, "total": 4})])
    with pytest.raises(ProtocolError):  # a client message type is not a service event
        decode(SERVICE, encode(CLIENT, "submit", images={"image": Image(ImageSpec(1, 1), b"1234")}, job="j"))


def test_every_message_type_has_a_schema_and_known_field_kinds():
    for table in (CLIENT_MESSAGES, SERVICE_MESSAGES):
        for fields in table.values():
            for f in fields.values():
                assert f.kind in ("str", "int", "float", "bool", "map", "list", "image", "upscale")


def test_the_largest_valid_message_is_a_header_and_one_mib():
    from krita_sdxl.protocol.codec import MAX_CLIENT_FRAMES, MAX_FRAME_BYTES, MAX_HEADER_BYTES

    assert MAX_CLIENT_FRAMES == 2 and MAX_FRAME_BYTES == MAX_CHUNK_BYTES == 2**20 and MAX_HEADER_BYTES < 2**20


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
