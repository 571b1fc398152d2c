"""The spec (protocol/README.md) names every message type and field that schema.py defines."""

from __future__ import annotations

from pathlib import Path

from krita_sdxl.protocol.schema import CLIENT_MESSAGES, SERVICE_MESSAGES

SPEC = (Path(__file__).resolve().parent.parent / "protocol" / "README.md").read_text(encoding="utf-8")


def test_every_message_type_and_field_is_documented() -> None:
    missing = []
    for table in (CLIENT_MESSAGES, SERVICE_MESSAGES):
        for msg_type, fields in table.items():
            if f"`{msg_type}`" not in SPEC:
                missing.append(msg_type)
            missing += [f"{msg_type}.{name}" for name in fields if f"`{name}`" not in SPEC]
    assert missing == []
