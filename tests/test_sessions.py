"""Issue 11, break 3 and the authorized-keys weak spots: nobody takes another client's session.
Real services (a `krita-sdxl serve --demo` subprocess, in-process CURVE services), real sockets."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth
from attack import CurveService, Peer, SlowEngine, final, good_id, header, keypair, rgba, submit_frames

from krita_sdxl.backend.cli.launcher import start_service


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    svc = start_service(["--demo", "--cache-dir", str(tmp_path_factory.mktemp("cache")), "--log-level", "warning"])
    yield svc
    assert svc.stop() == 0, svc.log


def long_job(job: str) -> dict:
    return dict(image=rgba(96, 96, seed=3), steps=12, strength=1.0, seed=7)


def test_a_forged_routing_id_gets_nothing_and_the_victim_keeps_its_job(demo):
    """The attack: a peer sets ROUTING_ID to a live client's id, asks for status, cancels, listens."""
    with Peer(demo.endpoint) as victim:
        events = [e for e in victim.submit("precious", **long_job("precious")) if e.type != "credit"]
        events += victim.events_until(lambda e: e.type == "progress", timeout=60)
        assert [e.type for e in events] == ["accepted", "progress"], [e.fields for e in events]
        with Peer(demo.endpoint, routing_id=victim.routing_id) as attacker:
            attacker.send([header("status")])
            attacker.send([header("cancel", job="precious")])
            attacker.send([header("hello", client="evil")])
            events += victim.events_until(final("precious"), timeout=60)
            assert attacker.recv(timeout=1.0) is None  # not a status, not an event, nothing at all
    assert events[-1].type == "result", events[-1].fields
    steps = [e["step"] for e in events if e.type == "progress"]
    assert steps == list(range(1, events[0]["denoise_steps"] + 1))  # every step reached the victim


@pytest.mark.parametrize(
    "routing_id",
    [None, b"\x00k\x8bEg", b"\x00" + b"k" * 20, b"short-id-15byte"],
    ids=["libzmq's own id", "forged libzmq id", "zero first byte", "15 bytes"],
)
def test_predictable_routing_ids_are_refused_and_get_no_work(demo, routing_id):
    with Peer(demo.endpoint, routing_id=routing_id) as peer:
        for frames in (submit_frames("mine", **long_job("mine")), [header("status")], [header("cancel", job="mine")]):
            event = peer.ask(frames)
            assert (event.type, event["code"]) == ("error", "bad_identity"), event.fields
            assert "ZMQ_ROUTING_ID" in event["message"] and "16 or more random bytes" in event["message"]
        assert event.job == "mine"
    with Peer(demo.endpoint) as good:
        status = good.ask([header("status")])
        assert status["queue_length"] == 0  # nothing was queued for them


def test_a_dead_peers_id_is_freed_for_the_same_client_reconnecting(demo):
    """ROUTER_HANDOVER is off, so a live id cannot be taken; a frozen peer stops answering the ZMTP
    pings, and its id is free again within seconds for the client that owns it."""
    routing_id = good_id()
    code = textwrap.dedent(
        f"""
        import sys, zmq
        s = zmq.Context().socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, {routing_id!r})
        s.connect({demo.endpoint!r})
        s.send(b'\\x82\\xa1v\\x02\\xa4type\\xa5hello')
        s.recv_multipart()
        print("connected", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "connected"
        proc.send_signal(signal.SIGSTOP)  # frozen: its connection stays open but answers no pings
        time.sleep(4.5)  # the ROUTER's heartbeat timeout is 3 s
        with Peer(demo.endpoint, routing_id=routing_id) as again:
            event = again.ask([header("hello", client="back")], timeout=10)
            assert event is not None and event.type == "welcome"
    finally:
        proc.kill()
        proc.wait()


# -- CURVE: jobs belong to (key, routing id) -------------------------------------------------


@pytest.fixture
def curve(tmp_path: Path):
    authorized = tmp_path / "authorized"
    artist = keypair(tmp_path / "clients", "artist", authorized)
    other = keypair(tmp_path / "clients", "other", authorized)  # a second authorized key: the attacker
    engine = SlowEngine(step_s=0.02, gate=True)
    svc = CurveService(tmp_path, authorized, engine)
    try:
        yield svc, engine, artist, other
    finally:
        engine.gate.set()
        svc.close()


def test_curve_a_second_key_with_the_same_id_gets_nothing_of_the_victim(curve):
    svc, engine, artist, other = curve
    with svc.peer(artist) as victim:
        assert victim.submit("precious", steps=40, strength=1.0)[-1].type == "accepted"
        with svc.peer(other, routing_id=victim.routing_id) as attacker:
            attacker.send([header("status")])
            attacker.send([header("cancel", job="precious")])
            time.sleep(0.3)
            engine.gate.set()
            events = victim.events_until(final("precious"), timeout=30)
            assert attacker.recv(timeout=0.5) is None
    assert events[-1].type == "result", events[-1].fields
    assert [e["step"] for e in events if e.type == "progress"] == list(range(1, 41))


def test_curve_an_id_left_by_its_client_is_not_handed_to_another_key(curve):
    """The victim's connection is gone (its id is free in ZeroMQ): another key connecting with that id is
    refused, cannot see or cancel the victim's jobs and gets none of their events."""
    svc, engine, artist, other = curve
    victim = svc.peer(artist)
    assert victim.submit("precious", steps=5, strength=1.0)[-1].type == "accepted"
    victim.close()
    time.sleep(0.3)
    with svc.peer(other, routing_id=victim.routing_id) as attacker:
        for frames in ([header("status")], [header("cancel", job="precious")]):
            event = attacker.ask(frames)
            assert (event.type, event["code"]) == ("error", "bad_identity"), event.fields
            assert "another client" in event["message"]
        engine.gate.set()
        time.sleep(0.5)  # the job runs now; its events must not reach the attacker
        assert attacker.recv(timeout=0.5) is None
    with svc.peer(artist) as artist_again:  # a new connection of the victim's key: status never crosses keys
        assert artist_again.ask([header("status")])["jobs"] == []


def test_curve_status_and_cancel_never_cross_keys(curve):
    svc, engine, artist, other = curve
    with svc.peer(artist) as a, svc.peer(other) as b:
        assert a.submit("same-id", steps=3)[-1].type == b.submit("same-id", steps=3)[-1].type == "accepted"
        assert [j["job"] for j in b.ask([header("status")])["jobs"]] == ["same-id"]
        assert b.ask([header("cancel", job="same-id")]).type == "cancelled"
        engine.gate.set()
        assert a.events_until(final("same-id"))[-1].type == "result"


# -- authorized keys: fail closed, removal ends a session, no globbing -----------------------


def test_deleting_the_authorized_keys_folder_admits_nobody(curve):
    svc, engine, artist, _other = curve
    engine.gate.set()
    with svc.peer(artist) as live:
        assert live.ask([header("hello")]).type == "welcome"
        shutil.rmtree(svc.authorized)
        time.sleep(0.6)  # the folder is checked every 0.2 s
        assert live.ask([header("hello")], timeout=1.0) is None  # the live session got nothing more
        with svc.peer(artist) as fresh:
            assert fresh.ask([header("hello")], timeout=1.5) is None  # and no new connection is admitted
        svc.authorized.mkdir()
        shutil.copy(artist.with_suffix(".key"), svc.authorized / "artist.key")
        time.sleep(0.6)
        with svc.peer(artist) as back:
            assert back.ask([header("hello")], timeout=5).type == "welcome"


def test_removing_a_key_ends_that_clients_live_session(curve):
    svc, engine, artist, other = curve
    with svc.peer(artist) as victim, svc.peer(other) as bystander:
        assert victim.submit("running", steps=200, strength=1.0)[-1].type == "accepted"
        assert victim.submit("queued", steps=2)[-1].type == "accepted"
        assert bystander.submit("theirs", steps=2)[-1].type == "accepted"
        engine.gate.set()
        assert victim.events_until(lambda e: e.type == "progress")[-1].type == "progress"
        (svc.authorized / "artist.key").unlink()
        time.sleep(0.6)
        while victim.recv(timeout=0.3) is not None:  # what was already on its way
            pass
        assert victim.ask([header("status")], timeout=1.0) is None  # refused: nothing more, ever
        assert bystander.events_until(final("theirs"))[-1].type == "result"  # the other key is served
        status = bystander.ask([header("status")])
        assert status["queue_length"] == 0  # the removed key's running and queued jobs were cancelled
        assert victim.recv(timeout=0.5) is None


def test_a_folder_name_with_glob_characters_loads_only_that_folder(tmp_path: Path):
    meant = tmp_path / "auth[x]"
    meant.mkdir()
    stranger = keypair(tmp_path / "authx", "stranger")  # what the glob auth[x]/*.key matches
    engine = SlowEngine()
    svc = CurveService(tmp_path, meant, engine)
    try:
        with svc.peer(stranger) as peer:
            assert peer.ask([header("hello")], timeout=1.5) is None
        member = keypair(tmp_path / "clients", "member", meant)
        time.sleep(0.6)
        with svc.peer(member) as peer:
            assert peer.ask([header("hello")], timeout=5).type == "welcome"
    finally:
        svc.close()


def test_a_public_key_file_as_the_services_secret_key_says_so(tmp_path: Path):
    public = Path(zmq.auth.create_certificates(str(tmp_path), "server")[0])
    (tmp_path / "authorized").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "krita_sdxl.backend.cli", "serve", "--identity", "--endpoint", "tcp://127.0.0.1:*",
         "--curve-secret-key", str(public), "--authorized-keys", str(tmp_path / "authorized")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "is a public key file" in proc.stderr and "key_secret" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_plugin_creates_its_secret_key_0600_without_a_chmod(tmp_path: Path, monkeypatch):
    """Created with mode 0600 in one step: never readable by others, not even for an instant (the
    chmods are switched off here, so a file created with the default mode would stay readable)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))
    from krita_sdxl_refiner.adapters.keys import KEY_NAME, ensure_client_keys, public_key_text

    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    monkeypatch.setattr(Path, "chmod", lambda *a, **k: None)
    old = os.umask(0)
    try:
        secret = ensure_client_keys(tmp_path / "keys")
    finally:
        os.umask(old)
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    public, key = zmq.auth.load_certificate(str(secret))
    assert key and len(public_key_text(secret)) == 40
    assert zmq.auth.load_certificate(str(tmp_path / "keys" / f"{KEY_NAME}.key"))[0] == public
    assert ensure_client_keys(tmp_path / "keys") == secret  # created once, then reused
    assert zmq.auth.load_certificate(str(secret))[1] == key
