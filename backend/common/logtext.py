"""What the log may say about a client: its text escaped, its routing id as a short hash (one helper each).

A client chooses its name, its job ids and every field it sends; written to the log as they are, a
newline in one forges a log line. ``escaped`` makes any text one printable line; ``EscapingFilter``
applies it to every record a handler writes, so no message of the service's log spans two lines.
A routing id is the secret a client's events are routed by: the log shows ``short_id`` (a hash).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

ELLIPSIS = "…"


def escaped(text: Any, limit: int = 200) -> str:
    """``text`` on one printable line: control and other unprintable characters (newlines, escape
    sequences, Unicode line separators) as Python escapes, cut to ``limit`` characters."""
    text = text if isinstance(text, str) else str(text)
    out = []
    size = 0
    for ch in text:
        part = ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        if ch == "\\":
            part = "\\\\"
        size += len(part)
        if size > limit:
            out.append(ELLIPSIS)
            break
        out.append(part)
    return "".join(out)


def short_id(routing: bytes) -> str:
    """A routing id as the log shows it: 8 hex digits of its SHA-256, never the id itself."""
    return hashlib.sha256(routing).hexdigest()[:8]


class EscapingFilter(logging.Filter):
    """A handler filter: the formatted message of every record on one line (a traceback, which the
    handler appends itself, keeps its lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: leave it to the handler
            return True
        if not message.isprintable():
            record.msg, record.args = escaped(message, 20_000), None
        return True
