"""Limits, vanished clients, a killed service, a short soak (the fuzzer: test_fuzz.py); real processes, sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest
import zmq
from soak import rgba, rss_kib, run_soak

from krita_sdxl.backend.cli.client import JobFailed, ServiceClient, ServiceUnavailable
from krita_sdxl.backend.cli.launcher import start_service


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def service(cache):
    svc = start_service(
        [
            "--demo",
            "--cache-dir",
            cache,
            "--log-level",
            "warning",
            "--heartbeat-timeout",
            "4",
            "--max-pixels",
            "262144",
            "--max-prompt-chars",
            "100",
            "--max-jobs-per-client",
            "3",
        ]
    )
    yield svc
    assert svc.stop() == 0, svc.log


@pytest.mark.parametrize(
    "params, field",
    [
        (dict(image=rgba(513, 512)), "image"),
        (dict(image=rgba(64, 64), work_width=1024, work_height=1024), "work_width"),
        (dict(image=rgba(64, 64), prompt="x" * 101), "prompt"),
        (dict(image=rgba(64, 64), negative_prompt="x" * 101), "negative_prompt"),
    ],
)
def test_limits_give_clear_errors(service, params, field):
    with ServiceClient(service.endpoint, timeout=30) as c:
        image = params.pop("image")
        with pytest.raises(JobFailed) as info:
            c.run(image, **params)
        assert (info.value.code, info.value.field) == ("limit", field)
        assert any(w in str(info.value) for w in ("at most", "exceeds", "the limit is"))


def test_jobs_per_client_limit(service):
    with ServiceClient(service.endpoint, timeout=30) as c:
        jobs = [c.submit(rgba(64, 64), prompt="x", steps=200, strength=1.0, seed=1) for _ in range(4)]
        first_events = {}
        while len(first_events) < 4:
            e = c.receive()
            if e.type != "credit":  # the uploads' progress
                first_events.setdefault(e.job, e)
        assert [first_events[j].type for j in jobs] == ["accepted", "accepted", "accepted", "error"]
        assert first_events[jobs[3]]["code"] == "limit"
        for j in jobs[:3]:
            c.cancel(j)
        done = 0
        while done < 3:
            if c.receive().type == "cancelled":
                done += 1


def test_oversized_frame_is_dropped_by_zeromq_and_service_keeps_serving(service, ctx):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(service.endpoint)
    header = msgpack.packb({"v": 2, "type": "chunk", "job": "big", "offset": 0})
    s.send_multipart([header, b"\0" * (1024 * 1024 + 1)])  # above ZMQ_MAXMSGSIZE (1 MiB): peer disconnected
    assert s.poll(1000) == 0
    s.close()
    with ServiceClient(service.endpoint, timeout=30) as c:
        assert c.run(rgba(32, 32), prompt="x", steps=2, seed=1).type == "result"


CLIENT_SCRIPT = textwrap.dedent(
    """
    import random, sys
    from krita_sdxl.backend.cli.client import ServiceClient
    from krita_sdxl.protocol import Image, ImageSpec
    c = ServiceClient(sys.argv[1], timeout=60)
    img = Image(ImageSpec(384, 384, "RGBA", 8), random.Random(1).randbytes(384 * 384 * 4))
    job = c.submit(img, prompt="x", steps=500, strength=1.0, seed=1)
    for e in c.events(job):  # keeps heartbeating while it waits, like a live plugin
        if e.type == "progress" and e["step"] == 1:
            print("running", flush=True)
    """
)


def test_kill_9_client_mid_job_cancels_its_job(service):
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, service.endpoint], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "running"
    rss_running = rss_kib(service.proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    with ServiceClient(service.endpoint, timeout=60) as c:
        # 500 steps at 384x384 would take far longer: this only finishes quickly if the job was cancelled
        assert c.run(rgba(32, 32), prompt="x", steps=2, seed=1).type == "result"
        elapsed = time.monotonic() - t0
        c.send("status")
        status = c.receive()
    assert elapsed < 15, elapsed
    assert status["queue_length"] == 0
    assert "vanished" in service.log
    print(f"service RSS while the job ran {rss_running} KiB, after {rss_kib(service.proc.pid)} KiB")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kill_9_service_mid_job_then_restart_and_resubmit(cache):
    port = _free_port()
    args = ["--demo", "--cache-dir", cache, "--log-level", "warning"]
    endpoint_args = ["--endpoint", f"tcp://127.0.0.1:{port}"]
    svc = start_service([*args, *endpoint_args])
    try:
        with ServiceClient(svc.endpoint, timeout=3) as c:
            image = rgba(64, 64, seed=9)
            params = dict(prompt="x", steps=400, strength=1.0, seed=3)
            job = c.submit(image, job="precious", **params)
            with pytest.raises(ServiceUnavailable):
                for e in c.events(job):
                    if e.type == "progress":
                        svc.proc.kill()
            svc.proc.wait()
            svc = start_service([*args, *endpoint_args])
            # the same socket reconnects by itself; the job is resubmitted with its settings intact
            params["steps"] = 10
            done = c.run(image, job="precious", timeout=30, **params)
            assert done.type == "result" and done["seed"] == 3
    finally:
        svc.stop()


SOAK_JOBS = int(os.environ.get("KRITA_SDXL_SOAK_JOBS", "96"))


def test_soak_short(service):
    report = run_soak(service.endpoint, service.proc.pid, SOAK_JOBS)
    print(f"\nsoak: {report}")
    assert not report["errors"], report["errors"][:5]
    assert report["results"] == report["unique"] == report["jobs"]  # none lost, none duplicated
    assert report["rss_growth"] < 0.10
