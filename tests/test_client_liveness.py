"""The blocking client stays alive in the service's eyes while a long job streams progress.

The service cancels the jobs of a client it has not heard from for ``heartbeat_timeout`` s. A client
that only sent heartbeats when nothing arrived was silent during a job whose steps come faster than
its heartbeat interval, so any such job longer than the timeout was cancelled as ``client_lost``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.engine.identity import IdentityEngine
from krita_sdxl.backend.engine.request import JobCancelled
from krita_sdxl.backend.service.server import Service
from krita_sdxl.protocol import Image, ImageSpec


class SteppingEngine(IdentityEngine):
    """Identity pixels after ``steps`` progress events ``pause`` s apart."""

    def __init__(self, steps: int, pause: float) -> None:
        self.steps, self.pause = steps, pause

    def refine(self, req: Any, on_progress: Any, should_stop: Any) -> Image:
        for i in range(1, self.steps + 1):
            time.sleep(self.pause)
            if should_stop():
                raise JobCancelled
            on_progress(i, self.steps, None)
        return req.image


def test_a_job_longer_than_the_heartbeat_timeout_with_fast_steps_is_not_cancelled(ctx) -> None:
    # The service's timeout; the job streams 4 s of progress, a step every 0.05 s. The client's heartbeats
    # (every 0.3 s) leave 1.7 s of slack for a starved CI machine.
    timeout = 2.0
    service = Service(SteppingEngine(80, 0.05), "tcp://127.0.0.1:*", ctx=ctx, heartbeat_timeout=timeout)
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    try:
        with ServiceClient(service.endpoint, timeout=10.0, heartbeat_interval=0.3) as client:
            image = Image(ImageSpec(16, 16, "RGBA", 8), bytes(16 * 16 * 4))
            steps: list[int] = []
            done = client.run(image, on_event=lambda e: steps.append(e["step"]) if e.type == "progress" else None)
            assert done.type == "result"  # JobFailed(client_lost) before the fix
            assert steps[-1] == 80
    finally:
        service.stop()
        thread.join(10)


def test_a_hello_that_is_never_answered_ends_within_the_timeout() -> None:
    """A peer that answers heartbeats but drops the hello (as the service did for a key authorized a
    moment before) kept `krita-sdxl info` waiting forever: every heartbeat reply reset the silence."""
    import msgpack

    from krita_sdxl.backend.cli.client import ServiceUnavailable

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def answer_heartbeats_only() -> None:
        while not stop.is_set():
            if router.poll(50):
                ident, header = router.recv_multipart()[:2]
                if msgpack.unpackb(header).get("type") == "heartbeat":
                    router.send_multipart([ident, msgpack.packb({"v": 2, "type": "heartbeat"})])

    thread = threading.Thread(target=answer_heartbeats_only, daemon=True)
    thread.start()
    try:
        with ServiceClient(f"tcp://127.0.0.1:{port}", timeout=1.5, heartbeat_interval=0.2) as client:
            t0 = time.monotonic()
            try:
                client.hello()
                raise AssertionError("hello returned without a welcome")
            except ServiceUnavailable as exc:
                assert "answers heartbeats but not hello within 1.5 s" in str(exc), exc
            assert 1.4 < time.monotonic() - t0 < 3.0
    finally:
        stop.set()
        thread.join(5)
        ctx.destroy(linger=0)
