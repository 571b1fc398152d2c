"""Issue 20, item 1: another authorized key received a closed client's results (CURVE).

In-process CURVE services on real sockets, a frozen client in a subprocess. Jobs belong to (key, routing
id): a client whose connection is gone is never replaced by another key that takes its routing id,
whatever the timing; its results are kept for it and reach it when it is back."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from attack import CurveService, Peer, Running, SlowEngine, final, header, keypair, limits, rgba

from krita_sdxl.backend.service.server import Service

TESTS = Path(__file__).resolve().parent


def sha(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


@pytest.fixture
def curve(tmp_path: Path):
    authorized = tmp_path / "authorized"
    artist = keypair(tmp_path / "clients", "artist", authorized)
    other = keypair(tmp_path / "clients", "other", authorized)  # authorized too: the attacker
    svc = CurveService(tmp_path, authorized, SlowEngine(step_s=0.1), limits=limits(hello_grace=2.0))
    try:
        yield svc, artist, other
    finally:
        svc.close()


def finished(events: list) -> set:
    return {e.job for e in events if e.type == "result"}


def listen(peer: Peer, seconds: float) -> list:
    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        event = peer.recv_raw(0.2)  # anything at all, as it comes
        if event is not None:
            got.append(event)
    return got


@pytest.mark.parametrize("when", ["after", "before"])
def test_another_key_with_a_closed_clients_id_gets_nothing_and_the_owner_gets_its_results(curve, when):
    """A submits a 3 s job and a queued one and closes its socket; B (another authorized key) connects
    with A's routing id, 0.2 s after the close or already before it, and listens. B gets nothing; A,
    back with its id and key, gets both results."""
    svc, artist, other = curve
    image, small = rgba(64, 64, seed=11), rgba(32, 32, seed=12)
    a = svc.peer(artist)
    routing = a.routing_id
    assert a.submit("long", image=image, steps=30, strength=1.0)[-1].type == "accepted"
    assert a.submit("queued", image=small, steps=2, strength=1.0)[-1].type == "accepted"
    b = svc.peer(other, routing_id=routing) if when == "before" else None
    time.sleep(0.2 if b is not None else 0.0)
    a.close()
    time.sleep(0.2)
    if b is None:
        b = svc.peer(other, routing_id=routing)
    got = listen(b, 1.5)
    b.send([header("status")])  # now it speaks: it is refused, and gets nothing of A's
    got += listen(b, 3.0)
    b.close()
    assert [(e.type, e.fields.get("code")) for e in got] in ([], [("error", "bad_identity")]), [e.fields for e in got]
    time.sleep(0.3)
    with svc.peer(artist, routing_id=routing) as back:
        back.send([header("hello", client="back")])
        events = back.events_until(final("long"), timeout=15)
        events += back.events_until(final("queued"), timeout=15) if "queued" not in finished(events) else []
    results = {e.job: e for e in events if e.type == "result"}
    assert set(results) == {"long", "queued"}, [(e.type, e.job) for e in events]
    assert sha(results["long"].images["image"].data) == sha(image.data)
    assert sha(results["queued"].images["image"].data) == sha(small.data)


FROZEN_CLIENT = """
import hashlib, json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from attack import Peer, header, rgba
peer = Peer({endpoint!r}, routing_id=bytes.fromhex({routing!r}), curve=({server!r}, Path({secret!r})))
events = peer.submit("long", image=rgba(64, 64, seed=11), steps=50, strength=1.0)
print(json.dumps({{"type": events[-1].type}}), flush=True)
last = 0.0
while True:
    event = peer.recv(0.3)
    if time.monotonic() - last > 0.5:
        peer.send([header("heartbeat")])
        last = time.monotonic()
    if event is not None and event.type not in ("heartbeat", "progress"):
        out = {{"type": event.type, "job": event.job}}
        if event.type == "result":
            out["sha"] = hashlib.sha256(bytes(event.images["image"].data)).hexdigest()
        print(json.dumps(out), flush=True)
"""


def test_a_frozen_clients_result_waits_for_it_not_for_the_key_that_takes_its_id(curve):
    """A freezes (SIGSTOP) and is dropped by the heartbeat after about 3 s; B connects with A's routing
    id at 4 s and listens: nothing. When A resumes, A gets its own result."""
    svc, artist, other = curve
    routing = b"t" + bytes(range(40, 56))
    code = FROZEN_CLIENT.format(
        tests=str(TESTS), endpoint=svc.endpoint, routing=routing.hex(), server=svc.server_public, secret=str(artist)
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline()) == {"type": "accepted"}
        proc.send_signal(signal.SIGSTOP)
        time.sleep(4.0)
        with svc.peer(other, routing_id=routing) as b:
            got = listen(b, 3.0)
        assert got == [], [e.fields for e in got]
        proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 20
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(json.loads(line))
            if seen[-1]["type"] == "result":
                break
        assert seen and seen[-1]["type"] == "result", seen
        assert seen[-1]["sha"] == sha(rgba(64, 64, seed=11).data)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_the_log_shows_a_hash_of_routing_ids_never_the_id(caplog):
    caplog.set_level(logging.INFO, logger="krita_sdxl")
    with Running(Service(SlowEngine(), "tcp://127.0.0.1:*")) as running, Peer(running.endpoint) as peer:
        assert peer.ask([header("hello", client="me")]).type == "welcome"
        assert peer.ask([header("submit", job="x", image={"width": 1, "height": 1}, steps=0)]).type == "error"
    assert f"hello from {hashlib.sha256(peer.routing_id).hexdigest()[:8]}" in caplog.text  # a short hash
    assert peer.routing_id.hex() not in caplog.text and peer.routing_id.hex()[:8] not in caplog.text
