"""The model download's progress as JSON lines (``krita-sdxl setup download --json-progress``),
written by the backend and read by the plugin: one object per line, ``{"event": KIND, ...}``.

Kinds: ``plan`` (files, total, needed, free: bytes), ``file`` (name, size), ``progress`` (done,
needed: bytes so far of what is needed), ``verify`` (name), ``done`` (repo, snapshot),
``error`` (why, what: what to do).
"""

from __future__ import annotations

import json
from typing import Any

KINDS = ("plan", "file", "progress", "verify", "done", "error")


def line(kind: str, **fields: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown event {kind!r}")
    return json.dumps({"event": kind, **fields}, separators=(",", ":"), default=str)


def parse(text: str) -> dict[str, Any] | None:
    """The event on one line of output, or None for any other line (pip's or a warning)."""
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("event") in KINDS else None
