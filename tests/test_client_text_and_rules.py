"""Issue 20, item 7: a client's text forged log lines; `v` 1.0 or true passed for 1; any client could
unload the models for everyone. Real services and sockets; the log of a real `serve` subprocess."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import msgpack
import pytest
from attack import CurveService, Peer, SlowEngine, header, host_address, keypair, rgba

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.protocol import PROTOCOL_VERSION

FORGED = "2026-12-07 12:00:00,000 ERROR krita_sdxl: FORGED LINE"


def test_a_clients_text_never_forges_a_log_line():
    svc = start_service(["--identity", "--log-level", "info"])
    try:
        with Peer(svc.endpoint) as peer:
            assert peer.ask([header("hello", client=f"artist\n{FORGED}\r\u2028{FORGED}")]).type == "welcome"
            events = peer.submit(f"job\n{FORGED}", image=rgba(8, 8), steps=2)  # job ids are logged too
            assert events[-1].type == "accepted", [e.fields for e in events]
            peer.events_until(lambda e: e.job == f"job\n{FORGED}" and e.type in ("result", "error", "cancelled"))
            assert peer.ask([header("submit", job=f"bad\n{FORGED}", image={"width": 0, "height": 1})]).type == "error"
            with ServiceClient(svc.endpoint, timeout=10) as c:  # the log has caught up
                c.hello()
            time.sleep(0.5)
    finally:
        assert svc.stop() == 0, svc.log
    lines = svc.log.splitlines()
    assert not any(line.startswith(FORGED) or line.startswith("\u2028") for line in lines), svc.log
    assert any("artist\\n2026-12-07" in line for line in lines), svc.log  # shown, escaped, on its own line
    assert any("job\\n2026-12-07" in line for line in lines), svc.log


@pytest.mark.parametrize("v", [float(PROTOCOL_VERSION), True], ids=["float", "true"])
def test_the_version_must_be_the_integer_over_the_wire(v):
    svc = start_service(["--identity", "--log-level", "warning"])
    try:
        with Peer(svc.endpoint) as peer:
            event = peer.ask([msgpack.packb({"v": v, "type": "hello"})])
            assert (event.type, event["code"], event["field"]) == ("error", "version_mismatch", "v"), event.fields
            event = peer.ask([msgpack.packb({"type": "hello"})])
            assert (event.type, event["code"], event["field"]) == ("error", "missing_field", "v"), event.fields
    finally:
        svc.stop()


def test_only_local_clients_and_admin_keys_may_unload(tmp_path: Path):
    authorized, admins = tmp_path / "authorized", tmp_path / "admins"
    artist = keypair(tmp_path / "clients", "artist", authorized)
    admin = keypair(tmp_path / "clients", "admin", authorized)
    admins.mkdir()
    shutil.copy(admin.with_suffix(".key"), admins / "admin.key")  # the same public key, in the admin folder too
    svc = CurveService(tmp_path, authorized, SlowEngine(), host="0.0.0.0", admin_keys=admins)
    remote = f"tcp://{host_address()}:{svc.port}"  # from this machine's network address: not loopback
    try:
        with Peer(remote, curve=(svc.server_public, artist)) as peer:
            assert peer.ask([header("hello")]).type == "welcome"
            refused = peer.ask([header("unload", model="base")])
            assert (refused.type, refused["code"], refused["field"]) == ("error", "forbidden", "model")
            assert "--admin-keys" in refused["message"]
        with Peer(remote, curve=(svc.server_public, admin)) as peer:
            assert peer.ask([header("unload", model="base")]).type == "unloaded"
        with svc.peer(artist) as local:  # loopback
            assert local.ask([header("unload", model="refiner")]).type == "unloaded"
    finally:
        svc.close()
