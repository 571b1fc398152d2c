"""Every message type and its fields: the single place where wire fields are defined and checked."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from .errors import BAD_FIELD, MISSING_FIELD, UNKNOWN_TYPE, ProtocolError, shown
from .images import MAX_SIDE, ImageSpec
from .policy import MAX_STEPS
from .upscale import UpscaleSpec
from .upscale import check_submit as check_upscale_submit

MAX_PROMPT_CHARS = 4000  # the one prompt limit: the codec refuses longer ones (a service may set a lower one)
MAX_JOB_ID_CHARS = 128
MAX_STREAM_OFFSET = 2**40  # far beyond any stream (the largest submit is about 1.1 GiB): a sanity bound
MAX_SEED = 2**64 - 1

_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One header field. ``kind``: str, int, float, bool, map, list, image, upscale. ``default`` absent = required."""

    kind: str
    default: Any = _REQUIRED
    nullable: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed
    max_len: int | None = None
    choices: tuple[str, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def check(self, name: str, value: Any) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise ProtocolError(BAD_FIELD, f"{name} must not be null", name)
        check = getattr(self, "_check_" + self.kind)
        return check(name, value)

    def _range_text(self) -> str:
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo}"
        hi = "" if self.hi is None else f"<= {self.hi}"
        return " and ".join(p for p in (lo, hi) if p)

    def _check_range(self, name: str, value: float, what: str) -> None:
        too_low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        too_high = self.hi is not None and value > self.hi
        if too_low or too_high:
            raise ProtocolError(BAD_FIELD, f"{name} must be {what} {self._range_text()}, got {value!r}", name)

    def _check_str(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise ProtocolError(BAD_FIELD, f"{name} must be a string, got {type(value).__name__}", name)
        if self.max_len is not None and len(value) > self.max_len:
            raise ProtocolError(BAD_FIELD, f"{name} is {len(value)} characters long; the limit is {self.max_len}", name)
        if self.choices is not None and value not in self.choices:
            raise ProtocolError(BAD_FIELD, f"{name} must be one of {', '.join(self.choices)}, got {value!r}", name)
        return value

    def _check_int(self, name: str, value: Any) -> int:
        if type(value) is not int:
            raise ProtocolError(BAD_FIELD, f"{name} must be an integer, got {type(value).__name__}", name)
        self._check_range(name, value, "an integer")
        return value

    def _check_float(self, name: str, value: Any) -> float:
        if type(value) not in (int, float):
            raise ProtocolError(BAD_FIELD, f"{name} must be a number, got {type(value).__name__}", name)
        value = float(value)
        if not math.isfinite(value):
            raise ProtocolError(BAD_FIELD, f"{name} must be a finite number, got {value!r}", name)
        self._check_range(name, value, "a number")
        return value

    def _check_bool(self, name: str, value: Any) -> bool:
        if type(value) is not bool:
            raise ProtocolError(BAD_FIELD, f"{name} must be true or false, got {type(value).__name__}", name)
        return value

    def _check_map(self, name: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise ProtocolError(BAD_FIELD, f"{name} must be a map, got {type(value).__name__}", name)
        return value

    def _check_list(self, name: str, value: Any) -> list:
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(BAD_FIELD, f"{name} must be a list, got {type(value).__name__}", name)
        return list(value)

    def _check_image(self, name: str, value: Any) -> ImageSpec:
        if isinstance(value, ImageSpec):
            return value
        return ImageSpec.from_wire(value, name)

    def _check_upscale(self, name: str, value: Any) -> UpscaleSpec:
        if isinstance(value, UpscaleSpec):
            return value
        return UpscaleSpec.from_wire(value, name)


def _str(default: Any = _REQUIRED, max_len: int = 1000, **kw: Any) -> Field:
    return Field("str", default, max_len=max_len, **kw)


JOB = Field("str", max_len=MAX_JOB_ID_CHARS)
OPTIONAL_JOB = Field("str", None, nullable=True, max_len=MAX_JOB_ID_CHARS)
OFFSET = Field("int", lo=0, hi=MAX_STREAM_OFFSET)

# Messages a client sends to the service.
CLIENT_MESSAGES: dict[str, dict[str, Field]] = {
    "hello": {"client": _str("", max_len=200)},
    "submit": {
        "job": JOB,
        "mode": _str("refine", max_len=40),
        "prompt": _str("", max_len=MAX_PROMPT_CHARS),
        "negative_prompt": _str("", max_len=MAX_PROMPT_CHARS),
        "strength": Field("float", 0.3, lo=0.0, hi=1.0),  # 0 only with upscale (RULES)
        "steps": Field("int", 50, lo=1, hi=MAX_STEPS),
        "guidance_scale": Field("float", 5.0, lo=0.0, hi=50.0),
        "seed": Field("int", None, nullable=True, lo=0, hi=MAX_SEED),
        "aesthetic_score": Field("float", 6.0, lo=0.0, hi=10.0),
        "negative_aesthetic_score": Field("float", 2.5, lo=0.0, hi=10.0),
        "preview": Field("bool", False),
        "work_width": Field("int", None, nullable=True, lo=8, hi=MAX_SIDE),
        "work_height": Field("int", None, nullable=True, lo=8, hi=MAX_SIDE),
        "feather": Field("float", 0.0, lo=0.0, hi=float(MAX_SIDE)),
        "transfer": _str("srgb", max_len=16, choices=("srgb", "linear")),
        "denoising_end": Field("float", 0.8, lo=0.0, lo_open=True, hi=1.0),
        "keep_unmasked": Field("bool", True),
        "live": Field("bool", False),
        "replaces": OPTIONAL_JOB,
        "image": Field("image"),
        "mask": Field("image", None, nullable=True),
        "upscale": Field("upscale", None, nullable=True),  # the result's size: protocol/upscale.py
    },
    "chunk": {"job": JOB, "offset": OFFSET},  # one frame of the submit's pixel stream follows the header
    "credit": {"job": JOB, "received": OFFSET},  # bytes of a result's stream received so far
    "cancel": {"job": JOB},
    "unload": {"model": _str(max_len=16, choices=("base", "refiner"))},
    "status": {"job": OPTIONAL_JOB},
    "heartbeat": {},
}

# Events the service sends to a client.
SERVICE_MESSAGES: dict[str, dict[str, Field]] = {
    "welcome": {"server": _str("", max_len=200), "capabilities": Field("map", {})},
    "accepted": {
        "job": JOB,
        "position": Field("int", lo=0),
        "seed": Field("int", lo=0, hi=MAX_SEED),
        "steps": Field("int", lo=1),
        "denoise_steps": Field("int", lo=0),  # 0: an upscale at strength 0
    },
    "progress": {
        "job": JOB,
        "step": Field("int", lo=0),
        "total": Field("int", lo=1),
        "preview": Field("image", None, nullable=True),
    },
    "credit": {"job": JOB, "received": OFFSET, "until": OFFSET},  # an upload may go on up to byte `until`
    "result": {
        "job": JOB,
        "seed": Field("int", lo=0, hi=MAX_SEED),
        "image": Field("image"),
        "elapsed": Field("float", 0.0, lo=0.0),
    },
    "error": {
        "job": OPTIONAL_JOB,
        "code": _str(max_len=64),
        "message": _str(max_len=4000),
        "field": _str(None, nullable=True, max_len=200),
    },
    "chunk": {"job": JOB, "offset": OFFSET},  # one frame of a result's pixel stream follows the header
    "cancelled": {"job": JOB, "reason": _str("cancelled", max_len=200)},
    "unloaded": {"model": _str(max_len=16), "was_loaded": Field("bool"), "deferred": Field("bool", False)},
    "status": {
        "running": Field("str", None, nullable=True),
        "jobs": Field("list", []),
        "queue_length": Field("int", 0, lo=0),
    },
    "heartbeat": {},
}

# Rules across the fields of one message, run after every field was checked alone.
RULES = {"submit": check_upscale_submit}

# Streamed image fields: their pixels do not follow the header; they travel as one byte stream (the
# images' bytes one after the other, in this order) in ``chunk`` messages (transfer.py).
STREAMED_SLOTS: dict[str, tuple[str, ...]] = {"submit": ("image", "mask"), "result": ("image",)}
# Messages whose header is followed by one raw payload frame (a piece of a stream).
PAYLOAD_TYPES = frozenset({"chunk"})

# Inline image fields (a ``progress`` preview), in the order their pixel frames follow the header frame.
IMAGE_SLOTS: dict[str, tuple[str, ...]] = {
    name: tuple(k for k, f in fields.items() if f.kind == "image" and k not in STREAMED_SLOTS.get(name, ()))
    for table in (CLIENT_MESSAGES, SERVICE_MESSAGES)
    for name, fields in table.items()
}


def schema_for(msg_type: Any, table: dict[str, dict[str, Field]]) -> dict[str, Field]:
    if msg_type is None:
        raise ProtocolError(MISSING_FIELD, "type is required in every message", "type")
    if not isinstance(msg_type, str) or msg_type not in table:
        known = ", ".join(sorted(table))
        raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {shown(msg_type)}; expected one of {known}", "type")
    return table[msg_type]


def validate_fields(msg_type: Any, raw: dict[str, Any], table: dict[str, dict[str, Field]]) -> dict[str, Any]:
    """Type- and range-check every field, fill defaults, reject unknown names. Returns a new dict."""
    schema = schema_for(msg_type, table)
    out: dict[str, Any] = {}
    for key in raw:
        if key not in schema:
            name = str(key)
            raise ProtocolError(BAD_FIELD, f"unknown field {shown(name)} in a {msg_type} message", name)
    for name, spec in schema.items():
        if name in raw:
            out[name] = spec.check(name, raw[name])
        elif spec.required:
            raise ProtocolError(MISSING_FIELD, f"{name} is required in a {msg_type} message", name)
        else:
            out[name] = copy.copy(spec.default)
    if "job" in schema and isinstance(out.get("job"), str) and not out["job"] and not schema["job"].nullable:
        raise ProtocolError(BAD_FIELD, "job must be a non-empty string", "job")
    if table is CLIENT_MESSAGES and msg_type in RULES:
        RULES[msg_type](out)
    return out
