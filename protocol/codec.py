"""Encode and decode multipart messages: one msgpack header frame, then one raw frame per image.

Pure functions over buffers; no sockets here. Zero-copy: decoding keeps pixel frames as the
caller's buffers (memoryview of a zmq frame), encoding returns them untouched for ``copy=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import BAD_HEADER, FRAME_MISMATCH, VERSION_MISMATCH, ProtocolError
from .images import Image, ImageSpec
from .schema import CLIENT_MESSAGES, IMAGE_SLOTS, SERVICE_MESSAGES, Field, validate_fields

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 256 * 1024

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

    @property
    def job(self) -> str | None:
        return self.fields.get("job")

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def encode(direction: str, msg_type: str, images: dict[str, Image] | None = None, **fields: Any) -> list[Any]:
    """Build the frames of one message. Fields are validated exactly as the receiver will."""
    images = images or {}
    table = _TABLES[direction]
    wire = dict(fields)
    for name, img in images.items():
        wire[name] = img.spec
    checked = validate_fields(msg_type, wire, table)
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg_type}
    for key, value in checked.items():
        header[key] = value.to_wire() if isinstance(value, ImageSpec) else value
    frames: list[Any] = [msgpack.packb(header, use_bin_type=True)]
    for slot in IMAGE_SLOTS[msg_type]:
        if checked.get(slot) is not None:
            if slot not in images:
                raise ValueError(f"{msg_type}.{slot} declared without pixels")
            frames.append(images[slot].data)
    return frames


def _peek_job(header: Any) -> str | None:
    if isinstance(header, dict):
        job = header.get("job")
        if isinstance(job, str) and 0 < len(job) <= 128:
            return job
    return None


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
        version = header.get("v")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                VERSION_MISMATCH,
                f"protocol version {version!r} received, this side speaks version {PROTOCOL_VERSION}; "
                "install matching versions of the Krita plugin and the krita-sdxl service",
                "v",
            )
        msg_type = header.get("type")
        fields = validate_fields(
            msg_type, {k: v for k, v in header.items() if k not in ("v", "type")}, _TABLES[direction]
        )
        images = _attach_images(msg_type, fields, frames[1:])
    except ProtocolError as err:
        err.job = err.job or job
        raise
    return Message(msg_type, fields, images)


def _attach_images(msg_type: str, fields: dict[str, Any], payload: Sequence[Any]) -> dict[str, Image]:
    slots = [s for s in IMAGE_SLOTS[msg_type] if fields.get(s) is not None]
    if len(payload) != len(slots):
        expected = ", ".join(slots) if slots else "none"
        raise ProtocolError(
            FRAME_MISMATCH,
            f"a {msg_type} message declaring images [{expected}] needs {len(slots)} pixel frame(s) "
            f"after the header, got {len(payload)}",
            slots[0] if slots else None,
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


def error_fields(err: ProtocolError) -> dict[str, Any]:
    """The fields of the ``error`` event that reports ``err``."""
    return {"job": err.job, "code": err.code, "message": err.message, "field": err.field}


__all__ = [
    "CLIENT",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "SERVICE",
    "Field",
    "Message",
    "decode",
    "decode_header",
    "encode",
    "error_fields",
]
