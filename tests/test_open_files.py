"""Issue 20, item 4: an attacker with no key ended every CURVE session by exhausting open files.

Real `krita-sdxl serve` subprocesses started with systemd's default soft limit (``ulimit -n 1024``),
1,100 idle TCP connections from this process, real CURVE clients. The service raises its soft limit to
the hard one at start, keeps the authorized keys it has when a reload fails for lack of resources, caps
its connections (closing those that never say anything) and never ends a session for a resource error."""

from __future__ import annotations

import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq.auth
from attack import Peer, header, keypair, rgba

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import start_service

IDLE = 1100


def start_with_systemds_soft_limit(args: list[str]):
    """``serve`` started with the soft limit systemd gives a service (1024; it inherits this process's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        return start_service(args)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files line")


def idle_connections(port: int, n: int) -> list[socket.socket]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this test process holds them all
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


def until(check, seconds: float):
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got


@pytest.fixture
def keys(tmp_path: Path):
    authorized = tmp_path / "authorized"
    server = keypair(tmp_path / "server", "server")
    artist = keypair(tmp_path / "clients", "artist", authorized)
    newcomer = keypair(tmp_path / "clients", "newcomer")  # authorized during the flood
    return tmp_path, authorized, server, artist, newcomer


@pytest.mark.slow
def test_idle_connections_end_no_curve_session_and_a_key_authorized_meanwhile_gets_in(keys):
    _tmp, authorized, server, artist, newcomer = keys
    svc = start_with_systemds_soft_limit(
        [
            "--identity",
            "--log-level",
            "warning",
            "--curve-secret-key",
            str(server),
            "--authorized-keys",
            str(authorized),
        ]
    )
    port = int(svc.endpoint.rsplit(":", 1)[1])
    server_public = zmq.auth.load_certificate(str(server))[0]
    idle: list[socket.socket] = []
    try:
        soft, hard = open_files_limit(svc.proc.pid)
        assert soft == hard, (soft, hard)  # raised at start
        with Peer(svc.endpoint, curve=(server_public, artist)) as live:
            assert live.ask([header("hello", client="artist")]).type == "welcome"
            idle = idle_connections(port, IDLE)
            shutil.copy(newcomer.with_suffix(".key"), authorized / "newcomer.key")  # a reload during the flood
            time.sleep(1.0)
            assert live.ask([header("heartbeat")]).type == "heartbeat"  # the live session goes on
            events = live.submit("during", image=rgba(32, 32, seed=1), steps=2)
            events += live.events_until(lambda e: e.job == "during" and e.type == "result", timeout=10)
            assert events[-1].type == "result", [e.fields for e in events]

            def newcomer_in():
                with Peer(svc.endpoint, curve=(server_public, newcomer)) as peer:
                    reply = peer.ask([header("hello", client="newcomer")], timeout=2)
                    return reply is not None and reply.type == "welcome"

            assert until(newcomer_in, 15), svc.log[-3000:]
        assert svc.proc.poll() is None
    finally:
        for s in idle:
            s.close()
        assert svc.stop() == 0, svc.log


@pytest.mark.slow
def test_idle_connections_keep_no_new_client_out_without_curve():
    svc = start_with_systemds_soft_limit(["--identity", "--log-level", "warning"])
    port = int(svc.endpoint.rsplit(":", 1)[1])
    idle: list[socket.socket] = []
    try:
        with ServiceClient(svc.endpoint, timeout=10) as before:
            before.hello()
            job = before.submit(rgba(64, 64, seed=2), steps=2)
            idle = idle_connections(port, IDLE)
            result = [e for e in before.events(job, timeout=10) if e.type != "credit"][-1]
            assert result.type == "result"  # no result lost to the flood

        def newcomer_answered():
            with ServiceClient(svc.endpoint, timeout=3) as c:
                try:
                    return c.run(rgba(16, 16), steps=2).type == "result"
                except ConnectionError:
                    return False

        started = time.monotonic()
        assert until(newcomer_answered, 15), svc.log[-3000:]
        assert time.monotonic() - started < 10
        assert "could not forward" not in svc.log
    finally:
        for s in idle:
            s.close()
        assert svc.stop() == 0, svc.log


def test_a_reload_that_runs_out_of_files_keeps_the_keys_it_had(tmp_path: Path):
    """In a process that really runs out of descriptors (EMFILE): the keys stay; once there are
    descriptors again, the folder's changes are read."""
    authorized = tmp_path / "authorized"
    keypair(tmp_path / "clients", "artist", authorized)
    code = f"""
import os, shutil, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from attack import keypair
from krita_sdxl.backend.service.authorized import AuthorizedKeys
keys = AuthorizedKeys(Path({str(authorized)!r}))
assert keys.reload() == frozenset() and len(keys.keys) == 1
keypair(Path({str(tmp_path / "clients")!r}), "second", Path({str(authorized)!r}))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
removed = keys.reload()
assert removed == frozenset() and len(keys.keys) == 1, (removed, keys.keys)
for fd in held:
    os.close(fd)
assert keys.reload() == frozenset() and len(keys.keys) == 2
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert "cannot be read now" in proc.stderr and "stay authorized" in proc.stderr
