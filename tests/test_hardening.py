"""Issue 11, breaks 1, 2 and 4: messages that killed the service, unbounded steps, ipc sockets taken over.
Real services (a `krita-sdxl serve` subprocess or an in-process Service), real ZeroMQ sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from attack import Peer, Running, SlowEngine, final, header, rgba, submit_frames

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.backend.service.security import SecurityError
from krita_sdxl.backend.service.server import Service

LONG = "x" * 5000


@pytest.fixture(scope="module")
def identity_service():
    svc = start_service(["--identity", "--log-level", "warning"])
    yield svc
    assert svc.proc.poll() is None, svc.log  # still alive after every attack
    assert svc.stop() == 0, svc.log


def nested(depth: int) -> bytes:
    """A hello whose ``v`` is a list nested ``depth`` deep (msgpack allows about 1,000)."""
    return b"\x82\xa1v" + b"\x91" * depth + b"\x02" + b"\xa4type\xa5hello"


# Each of these made the service's own error event fail validation (or recurse) and the process exit 1.
ECHO_ATTACKS = [
    ("unknown key of 201 chars", header("hello", **{"k" * 201: 1}), "bad_field"),
    ("unknown key of 100,000 chars", header("hello", **{"k" * 100_000: 1}), "bad_field"),
    ("type as a 5,000-char string", msgpack.packb({"v": 2, "type": LONG}), "unknown_type"),
    ("v as a 5,000-char string", msgpack.packb({"v": LONG, "type": "hello"}), "version_mismatch"),
    ("v as a 1,000-element list", msgpack.packb({"v": list(range(1000)), "type": "hello"}), "version_mismatch"),
    ("image.width as a long string", header("submit", job="j", image={"width": LONG, "height": 8}), "bad_field"),
    ("image.order long", header("submit", job="j", image={"width": 8, "height": 8, "order": LONG}), "bad_field"),
    ("image.depth long", header("submit", job="j", image={"width": 8, "height": 8, "depth": LONG}), "bad_field"),
    ("image.sample long", header("submit", job="j", image={"width": 8, "height": 8, "sample": LONG}), "bad_field"),
    ("unknown image key", header("submit", job="j", image={"width": 8, "height": 8, "q" * 300: 1}), "bad_field"),
    ("mode long", header("submit", job="j", mode=LONG, image={"width": 8, "height": 8}), "bad_field"),
    ("nested 100 deep", nested(100), "bad_header"),
    ("nested 1,000 deep (RecursionError before)", nested(1000), "bad_header"),
    ("nested 5,000 deep", nested(5000), "bad_header"),
]


@pytest.mark.parametrize("frame", [a[1] for a in ECHO_ATTACKS], ids=[a[0] for a in ECHO_ATTACKS])
def test_echoed_text_never_breaks_the_error_event(identity_service, frame):
    code = {a[1]: a[2] for a in ECHO_ATTACKS}[frame]
    with Peer(identity_service.endpoint) as peer:
        event = peer.ask([frame])
        assert event is not None, "no answer: " + identity_service.log[-2000:]
        assert event.type == "error" and event["code"] == code, event.fields  # decoded and validated
        assert len(event["message"]) <= 4000 and (event["field"] is None or len(event["field"]) <= 200)
        assert identity_service.proc.poll() is None
        assert peer.ask([header("heartbeat")]).type == "heartbeat"  # same connection, still served
    with ServiceClient(identity_service.endpoint, timeout=10) as c:
        assert c.run(rgba(8, 8), prompt="after", steps=2, strength=0.5).type == "result"


def test_a_message_with_too_many_frames_is_refused_without_reading_them_all(identity_service):
    with Peer(identity_service.endpoint) as peer:
        frames = [*submit_frames("many"), *([b"x"] * 100_000)]
        event = peer.ask(frames, timeout=30)
        assert (event.type, event["code"], event.job) == ("error", "frame_mismatch", "many")
        assert "at most 2 frames" in event["message"], event["message"]
        assert peer.submit("then-one", steps=2)[-1].type == "accepted"


# -- break 2: steps ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modes_service():
    """A service whose engine takes every mode and plans with the real SDXL scheduler's timesteps
    (its jobs return their input: on the code before the fix these plans ran to gigabytes)."""
    with Running(Service(SlowEngine(modes=("refine", "generate", "two_stage")), "tcp://127.0.0.1:*")) as running:
        yield running


STEP_ATTACKS = [
    (dict(strength=1e-8), "strength", "0.002"),
    (dict(strength=1e-30), "strength", "0.002"),
    (dict(mode="two_stage", strength=1e-9), "strength", "0.002"),
    (dict(mode="generate", strength=1.0, denoising_end=1e-300), "denoising_end", "0.001"),
    (dict(mode="generate", strength=1.0, denoising_end=0.0004, steps=500), "denoising_end", "0.001"),
]


@pytest.mark.parametrize(("params", "field", "smallest"), STEP_ATTACKS)
def test_steps_stay_within_the_protocol_and_nothing_is_queued(modes_service, params, field, smallest):
    with Peer(modes_service.endpoint) as peer:
        event = peer.submit("tiny", **params)[-1]
        assert (event.type, event["code"], event["field"], event.job) == ("error", "bad_field", field, "tiny")
        assert f"use {field} {smallest} or more" in event["message"] or f"works is {smallest}" in event["message"]
        status = peer.ask([header("status")])
        assert status.type == "status" and status["jobs"] == [] and status["queue_length"] == 0  # no ghost job


@pytest.mark.parametrize(
    "params",
    [dict(strength=0.002, steps=1), dict(mode="generate", strength=1.0, denoising_end=0.001), dict(steps=500)],
)
def test_the_smallest_values_that_work_plan_at_most_500_steps(modes_service, params):
    with Peer(modes_service.endpoint) as peer:
        events = peer.submit("ok", **params)
        events += peer.events_until(final("ok"), timeout=30)
        events = [e for e in events if e.type != "credit"]
        assert events[0].type == "accepted" and 1 <= events[0]["steps"] <= 500, events[0].fields
        assert events[-1].type == "result", events[-1].fields


# -- break 4: ipc ----------------------------------------------------------------------------


def test_a_second_serve_cannot_take_a_live_ipc_socket(tmp_path: Path):
    path = tmp_path / "service.sock"
    first = start_service(["--identity", "--log-level", "warning", "--endpoint", f"ipc://{path}"])
    try:
        assert first.endpoint == f"ipc://{path}"
        second = subprocess.run(
            [sys.executable, "-m", "krita_sdxl.backend.cli", "serve", "--identity", "--endpoint", f"ipc://{path}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        assert "another service is already listening there" in second.stderr
        assert "Traceback" not in second.stderr
        with ServiceClient(first.endpoint, timeout=10) as c:  # the first one still has its socket
            assert c.run(rgba(8, 8), steps=2, strength=0.5).type == "result"
    finally:
        assert first.stop() == 0, first.log
    first = start_service(["--identity", "--log-level", "warning", "--endpoint", f"ipc://{path}"])
    first.proc.kill()  # a killed service leaves its socket file: the next serve replaces it
    first.proc.wait()
    assert path.exists()
    again = start_service(["--identity", "--log-level", "warning", "--endpoint", f"ipc://{path}"])
    try:
        with ServiceClient(again.endpoint, timeout=10) as c:
            assert c.run(rgba(8, 8), steps=2, strength=0.5).type == "result"
    finally:
        again.stop()


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to make a foreign socket")
def test_a_socket_of_another_user_is_refused(tmp_path: Path):
    path = tmp_path / "squat.sock"
    squatter = socket.socket(socket.AF_UNIX)
    squatter.bind(str(path))
    squatter.listen()
    os.chown(path, 65534, 65534)
    try:
        with pytest.raises(SecurityError, match=r"belongs to .*65534"):
            Service(SlowEngine(), f"ipc://{path}")
        assert path.exists() and os.stat(path).st_uid == 65534  # left alone, not unlinked
    finally:
        squatter.close()
