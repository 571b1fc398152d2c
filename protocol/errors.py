"""Error codes carried by ``error`` events, the exception that produces them, and the clipping of
the untrusted text an error message echoes (so that no ``error`` event can ever fail to encode)."""

from __future__ import annotations

import reprlib
from typing import Any

# Machine-readable codes. Clients branch on these; the human message is for people.
BAD_HEADER = "bad_header"  # header frame is not a msgpack map, or too large
VERSION_MISMATCH = "version_mismatch"  # header "v" differs from PROTOCOL_VERSION
UNKNOWN_TYPE = "unknown_type"  # "type" is not a known message type
MISSING_FIELD = "missing_field"  # a required field is absent
BAD_FIELD = "bad_field"  # wrong type, out of range, unknown field name
FRAME_MISMATCH = "frame_mismatch"  # pixel frames do not match the declared images
UNSUPPORTED = "unsupported"  # valid message, but this service cannot do it (mode, format)
DUPLICATE_JOB = "duplicate_job"  # job id already queued or running for this client
UNKNOWN_JOB = "unknown_job"  # cancel/status for a job this client does not have
LIMIT = "limit"  # a size or count limit of the service was exceeded
MODEL_ERROR = "model_error"  # the pipeline failed while running the job
OUT_OF_MEMORY = "out_of_memory"  # the accelerator ran out of memory
SHUTTING_DOWN = "shutting_down"  # the service is stopping and takes no new jobs
INTERNAL = "internal"  # a bug in the service; the message says what happened
BAD_IDENTITY = "bad_identity"  # the client's ZeroMQ routing id is predictable, or another client's
FORBIDDEN = "forbidden"  # this client may not do that (unload from another machine without an admin key)

ALL_CODES = frozenset(
    {
        BAD_HEADER,
        VERSION_MISMATCH,
        UNKNOWN_TYPE,
        MISSING_FIELD,
        BAD_FIELD,
        FRAME_MISMATCH,
        UNSUPPORTED,
        DUPLICATE_JOB,
        UNKNOWN_JOB,
        LIMIT,
        MODEL_ERROR,
        OUT_OF_MEMORY,
        SHUTTING_DOWN,
        INTERNAL,
        BAD_IDENTITY,
        FORBIDDEN,
    }
)

ELLIPSIS = "…"


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters; a cut text ends with an ellipsis."""
    if len(text) <= limit:
        return text
    return text[: limit - 1] + ELLIPSIS if limit > 0 else ""


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40
for _name in ("maxdict", "maxlist", "maxtuple", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_REPR, _name, 6)


def shown(value: Any, limit: int = 80) -> str:
    """A short repr of an untrusted value for an error message: long strings, deep or long
    containers and huge numbers are abbreviated (never a RecursionError, never megabytes)."""
    try:
        return clip(_REPR.repr(value), limit)
    except Exception:  # a repr that fails: say what it was
        return f"<{type(value).__name__}>"


class ProtocolError(ValueError):
    """A message that cannot be accepted. Becomes an ``error`` event on the wire."""

    def __init__(self, code: str, message: str, field: str | None = None, job: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.job = job

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, field={self.field!r}, job={self.job!r})"
