"""Issue 20, item 3: one message of many frames was buffered whole (1.34 GB at 1,000 frames of 1 MiB)
before it was refused. A real `krita-sdxl serve` subprocess, a raw DEALER as the attacker; the
service's resident memory is read from /proc."""

from __future__ import annotations

import time

import pytest
import zmq
from attack import header, rgba
from soak import rss_kib

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import start_service

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def service():
    svc = start_service(["--identity", "--log-level", "warning"])
    yield svc
    assert svc.proc.poll() is None, svc.log
    assert svc.stop() == 0, svc.log


def flood(endpoint: str, frames: int) -> bool:
    """A heartbeat header and ``frames`` frames of 1 MiB as one message; whether the service cut the
    connection (the attacker's socket sees it go)."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, b"attacker-" + bytes(range(16)))
        sock.setsockopt(zmq.SNDHWM, 0)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(endpoint)
        payload = b"\xab" * MiB
        sock.send_multipart([header("heartbeat"), *([payload] * frames)], copy=False)  # zero-copy: one buffer
        return monitor.poll(10_000) != 0
    finally:
        ctx.destroy(linger=0)


def test_a_message_of_many_frames_is_cut_off_before_the_service_holds_it(service):
    pid = service.proc.pid
    with ServiceClient(service.endpoint, timeout=10) as c:
        c.hello()
    before = rss_kib(pid)
    peak = before
    cut = flood(service.endpoint, 400)  # 400 MiB in one message
    for _ in range(10):
        peak = max(peak, rss_kib(pid))
        time.sleep(0.05)
    assert cut, "the service never dropped the connection"
    assert (peak - before) * 1024 < 96 * MiB, f"RSS grew by {(peak - before) / 1024:.0f} MiB"  # was 400+ MiB
    with ServiceClient(service.endpoint, timeout=10) as c:  # everyone else is served as before
        assert c.run(rgba(64, 64), steps=2, strength=0.5).type == "result"
    assert "shut down a connection holding" in service.log
