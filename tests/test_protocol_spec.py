"""The spec (protocol/README.md) says what the code does: every message type and field, every error code,
and every limit it documents, checked against the constants."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from krita_sdxl.backend.service.limits import Limits
from krita_sdxl.protocol.errors import ALL_CODES
from krita_sdxl.protocol.schema import CLIENT_MESSAGES, MAX_PROMPT_CHARS, SERVICE_MESSAGES, Field

SPEC = (Path(__file__).resolve().parent.parent / "protocol" / "README.md").read_text(encoding="utf-8")


def test_every_message_type_and_field_is_documented() -> None:
    missing = []
    for table in (CLIENT_MESSAGES, SERVICE_MESSAGES):
        for msg_type, fields in table.items():
            if f"`{msg_type}`" not in SPEC:
                missing.append(msg_type)
            missing += [f"{msg_type}.{name}" for name in fields if f"`{name}`" not in SPEC]
    assert missing == []


def _section(title: str) -> str:
    start = SPEC.index(title)
    end = SPEC.find("\n## ", start + len(title))
    return SPEC[start : end if end != -1 else len(SPEC)]


def _resolve(path: str) -> object:
    """``protocol.codec.X`` or ``backend.service.limits.Limits.x`` (a default) or a schema field's limit."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module("krita_sdxl." + ".".join(parts[:i]))
            break
        except ImportError:
            continue
    for name in parts[i:]:
        value = value[name] if isinstance(value, dict) else getattr(value, name)
    return value.max_len if isinstance(value, Field) else value


def test_the_documented_limits_are_the_codes():
    """Issue 20, item 8: the spec said 8000 prompt characters and the service refused more than 4000."""
    rows = re.findall(r"^\| ([^|]+) \| ([0-9.]+) \| `([a-zA-Z_.]+)` \|$", _section("## Limits"), re.M)
    assert len(rows) >= 20, rows
    wrong = [(what, value, path, _resolve(path)) for what, value, path in rows if float(value) != _resolve(path)]
    assert wrong == []
    assert Limits().max_prompt_chars == MAX_PROMPT_CHARS  # one prompt limit: the service's default is the protocol's


def test_the_documented_error_codes_are_the_codes():
    documented = set(re.findall(r"^\| `([a-z_]+)` \| ", _section("Error codes"), re.M))
    assert documented == set(ALL_CODES)
