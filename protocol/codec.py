"""Encode and decode messages: one msgpack header frame, then at most one raw frame.

The raw frame is a ``chunk``'s piece of a pixel stream (transfer.py) or a ``progress`` preview;
a submit's and a result's pixels never follow their header (they are streamed in chunks).
Pure functions over buffers; no sockets here. Zero-copy: decoding keeps raw frames as the
caller's buffers (memoryview of a zmq frame), encoding returns them untouched for ``copy=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import BAD_HEADER, FRAME_MISMATCH, MISSING_FIELD, VERSION_MISMATCH, ProtocolError, clip, shown
from .images import Image, ImageSpec
from .schema import (
    CLIENT_MESSAGES,
    IMAGE_SLOTS,
    MAX_JOB_ID_CHARS,
    PAYLOAD_TYPES,
    SERVICE_MESSAGES,
    STREAMED_SLOTS,
    Field,
    validate_fields,
)
from .transfer import MAX_CHUNK_BYTES
from .upscale import UpscaleSpec

PROTOCOL_VERSION = 2  # 2: pixels in chunks under credit (transfer.py); 1 sent them whole after the header
MAX_HEADER_BYTES = 256 * 1024
MAX_HEADER_DEPTH = 32  # nesting of maps and lists in a header (a valid one needs 4 at most)
# Every message: a header frame and at most one raw frame (a chunk, or a preview), none larger than this.
MAX_CLIENT_FRAMES = 2
MAX_FRAME_BYTES = max(MAX_CHUNK_BYTES, MAX_HEADER_BYTES)

CLIENT = "client"  # messages a client sends (the service decodes these)
SERVICE = "service"  # events the service sends (a client decodes these)
_TABLES = {CLIENT: CLIENT_MESSAGES, SERVICE: SERVICE_MESSAGES}


@dataclass
class Message:
    """A decoded or to-be-encoded message. ``fields`` excludes ``v`` and ``type``; image specs live
    in ``fields`` as :class:`ImageSpec` and their pixels in ``images``."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Image] = field(default_factory=dict)
    payload: Any = None  # a chunk's bytes (a memoryview of its frame)

    @property
    def job(self) -> str | None:
        return self.fields.get("job")

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def encode(
    direction: str, msg_type: str, images: dict[str, Image] | None = None, payload: Any = None, **fields: Any
) -> list[Any]:
    """Build the frames of one message. Fields are validated exactly as the receiver will.
    Streamed images (a submit's, a result's) give their specs only: send their bytes with
    :func:`stream_buffers` and ``chunk`` messages. ``payload``: a chunk's bytes."""
    images = images or {}
    table = _TABLES[direction]
    wire = dict(fields)
    for name, img in images.items():
        wire[name] = img.spec
    checked = validate_fields(msg_type, wire, table)
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg_type}
    for key, value in checked.items():
        header[key] = value.to_wire() if isinstance(value, (ImageSpec, UpscaleSpec)) else value
    frames: list[Any] = [msgpack.packb(header, use_bin_type=True)]
    for slot in IMAGE_SLOTS[msg_type]:
        if checked.get(slot) is not None:
            if slot not in images:
                raise ValueError(f"{msg_type}.{slot} declared without pixels")
            frames.append(images[slot].data)
    if msg_type in PAYLOAD_TYPES:
        if payload is None:
            raise ValueError(f"a {msg_type} message needs its payload")
        frames.append(payload)
    return frames


def stream_specs(msg: Message) -> list[tuple[str, ImageSpec]]:
    """The streamed images a submit or a result declares, in stream order."""
    return [(s, msg.fields[s]) for s in STREAMED_SLOTS.get(msg.type, ()) if msg.fields.get(s) is not None]


def stream_buffers(msg_type: str, images: dict[str, Image]) -> list[Any]:
    """The pixel buffers of a message's streamed images, in stream order."""
    return [images[s].data for s in STREAMED_SLOTS.get(msg_type, ()) if images.get(s) is not None]


def _peek_job(header: Any) -> str | None:
    if isinstance(header, dict):
        job = header.get("job")
        if isinstance(job, str) and 0 < len(job) <= MAX_JOB_ID_CHARS:
            return job
    return None


def peek_job(frame: Any) -> str | None:
    """The job id of a header frame, if it has a readable one; never raises."""
    try:
        return _peek_job(decode_header(frame))
    except ProtocolError:
        return None


def _check_depth(header: dict[str, Any]) -> None:
    """Refuse deep nesting without recursion (a deep header would exhaust the stack of repr and co)."""
    stack: list[tuple[Any, int]] = [(header, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_HEADER_DEPTH:
            raise ProtocolError(BAD_HEADER, f"header is nested more than {MAX_HEADER_DEPTH} levels deep")
        items = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))


def decode_header(frame: Any) -> dict[str, Any]:
    """Unpack a header frame into a map, with hard limits against hostile input."""
    data = memoryview(frame)
    if data.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(BAD_HEADER, f"header frame is {data.nbytes} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=MAX_HEADER_BYTES,
            max_array_len=4096,
            max_map_len=256,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError(BAD_HEADER, f"header frame is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(BAD_HEADER, f"header must be a msgpack map, got {type(header).__name__}")
    _check_depth(header)
    return header


def decode(direction: str, frames: Sequence[Any]) -> Message:
    """Validate and decode the frames of one message (without any routing identity frame).

    ``direction`` says who sent it: CLIENT for what a service receives, SERVICE for what a client
    receives. Raises :class:`ProtocolError` naming the problem; its ``job`` is set when the header
    carried a readable job id, so the error can be routed to that job.
    """
    if not frames:
        raise ProtocolError(BAD_HEADER, "empty message: expected a header frame")
    header = decode_header(frames[0])
    job = _peek_job(header)
    try:
        if "v" not in header:
            raise ProtocolError(MISSING_FIELD, "v (the protocol version) is required in every message", "v")
        version = header["v"]
        if type(version) is not int or version != PROTOCOL_VERSION:  # 1.0 and true are not the integer 1
            raise ProtocolError(
                VERSION_MISMATCH,
                f"protocol version {shown(version)} received, this side speaks version {PROTOCOL_VERSION}; "
                "install matching versions of the Krita plugin and the krita-sdxl service",
                "v",
            )
        raw_type = header.get("type")
        fields = validate_fields(
            raw_type, {k: v for k, v in header.items() if k not in ("v", "type")}, _TABLES[direction]
        )
        msg_type = str(raw_type)  # a known type name: validate_fields refused anything else
        payload = None
        rest = frames[1:]
        if msg_type in PAYLOAD_TYPES:
            payload = _payload(msg_type, rest)
            rest = []
        images = _attach_images(msg_type, fields, rest)
    except ProtocolError as err:
        err.job = err.job or job
        raise
    return Message(msg_type, fields, images, payload)


def _payload(msg_type: str, rest: Sequence[Any]) -> memoryview:
    if len(rest) != 1:
        raise ProtocolError(
            FRAME_MISMATCH, f"a {msg_type} message needs exactly one frame after its header, got {len(rest)}", None
        )
    data = memoryview(rest[0])
    if not 0 < data.nbytes <= MAX_CHUNK_BYTES:
        raise ProtocolError(
            FRAME_MISMATCH, f"a {msg_type} holds 1 to {MAX_CHUNK_BYTES} bytes, this one {data.nbytes}", "offset"
        )
    return data


def _attach_images(msg_type: str, fields: dict[str, Any], payload: Sequence[Any]) -> dict[str, Image]:
    slots = [s for s in IMAGE_SLOTS[msg_type] if fields.get(s) is not None]
    if len(payload) != len(slots):
        if not slots:
            streamed = STREAMED_SLOTS.get(msg_type)
            how = f": its {' and '.join(streamed)} pixels follow in chunk messages" if streamed else ""
            raise ProtocolError(
                FRAME_MISMATCH,
                f"a {msg_type} message is its header frame alone, got {len(payload)} more frame(s){how}",
                None,
            )
        expected = ", ".join(slots)
        raise ProtocolError(
            FRAME_MISMATCH,
            f"a {msg_type} message declaring images [{expected}] needs {len(slots)} pixel frame(s) "
            f"after the header, got {len(payload)}",
            slots[0],
        )
    images: dict[str, Image] = {}
    for slot, frame in zip(slots, payload, strict=True):
        spec: ImageSpec = fields[slot]
        data = memoryview(frame)
        if data.nbytes != spec.byte_length:
            raise ProtocolError(
                FRAME_MISMATCH,
                f"{slot} declares {spec.width}x{spec.height} {spec.order} {spec.depth}-bit = "
                f"{spec.byte_length} bytes, but its frame holds {data.nbytes} bytes",
                slot,
            )
        images[slot] = Image(spec, data)
    return images


def error_event(job: Any, code: str, message: str, field: Any = None) -> dict[str, Any]:
    """Fields of an ``error`` event that always encode: every text is clipped to its schema limit
    (echoed names and values can be anything a peer sent), a job id that is not valid is dropped."""
    schema = SERVICE_MESSAGES["error"]
    valid_job = isinstance(job, str) and 0 < len(job) <= MAX_JOB_ID_CHARS
    return {
        "job": job if valid_job else None,
        "code": clip(str(code), schema["code"].max_len or 64),
        "message": clip(str(message), schema["message"].max_len or 4000) or "error",
        "field": None if field is None else clip(str(field), schema["field"].max_len or 200),
    }


def error_fields(err: ProtocolError) -> dict[str, Any]:
    """The fields of the ``error`` event that reports ``err`` (clipped: see :func:`error_event`)."""
    return error_event(err.job, err.code, err.message, err.field)


__all__ = [
    "CLIENT",
    "MAX_CLIENT_FRAMES",
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DEPTH",
    "PROTOCOL_VERSION",
    "SERVICE",
    "Field",
    "Message",
    "decode",
    "decode_header",
    "encode",
    "error_event",
    "error_fields",
    "peek_job",
    "stream_buffers",
    "stream_specs",
]
