"""A refine whose service dies: it must not wait forever. Killed and restarted on the same endpoint,
the client learns within the heartbeat timeout that the new service does not know its job (exit 3);
killed for good, it gives up after --timeout (exit 1)."""

from __future__ import annotations

import socket
import time

import pytest
from cli_helpers import jobs_seen, rgba_picture, spawn

from krita_sdxl.backend.cli.launcher import ServiceProcess, start_service

HEARTBEAT_TIMEOUT = 10.0  # the service's default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(endpoint: str) -> ServiceProcess:
    return start_service(["--demo", "--speed", "off", "--endpoint", endpoint])


def start_long_job(svc: ServiceProcess, picture, out):
    before = jobs_seen(svc.log)
    proc = spawn("refine", str(picture), "--endpoint", svc.endpoint, "--steps", "500", "--strength", "1",
                 "-o", str(out))  # fmt: skip
    deadline = time.monotonic() + 60
    while jobs_seen(svc.log) == before and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_a_restarted_service_makes_the_client_exit_job_lost(demo_models, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    picture, out = rgba_picture(tmp_path / "in.png"), tmp_path / "out.png"
    first = serve(endpoint)
    proc = start_long_job(first, picture, out)
    first.proc.kill()
    first.proc.wait()
    second = serve(endpoint)
    try:
        restarted = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - restarted
    finally:
        proc.kill()
        second.stop()
    assert proc.returncode == 3, stderr
    assert "Traceback" not in stderr
    assert "the service restarted; job lost" in stderr.splitlines()[-1]
    assert took < HEARTBEAT_TIMEOUT, took
    assert not out.exists()


@pytest.mark.slow
def test_a_service_gone_for_good_ends_the_wait_after_the_timeout(demo_models, tmp_path):
    picture, out = rgba_picture(tmp_path / "in.png"), tmp_path / "out.png"
    svc = serve(f"ipc://{tmp_path}/s.sock")
    before = jobs_seen(svc.log)
    proc = spawn("refine", str(picture), "--endpoint", svc.endpoint, "--steps", "500", "--strength", "1",
                 "--timeout", "3", "-o", str(out))  # fmt: skip
    while jobs_seen(svc.log) == before:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    svc.proc.kill()
    svc.proc.wait()
    gone = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "lost the connection" in stderr.splitlines()[-1] and "Traceback" not in stderr
    assert time.monotonic() - gone < 3 + 5
