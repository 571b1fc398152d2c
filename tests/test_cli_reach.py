"""With no service where the command looks, it says why within seconds (nothing listens, a stale ipc socket,
a host name that does not resolve, an HTTP server on the port), while a ZeroMQ service that is merely slow
still gets the whole --timeout."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import zmq
from cli_helpers import assert_refused, krita_sdxl, rgba_picture


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = krita_sdxl(*args)
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> float:
    """Seconds within which the verdict must come: the command's own start and a refusal that needs no
    network (a missing ipc socket), measured here, plus the ~2 s verdict and a margin for a busy machine."""
    missing = tmp_path_factory.mktemp("none") / "none.sock"
    proc, took = timed("info", "--endpoint", f"ipc://{missing}")
    assert_refused(proc, 1, "does not exist")
    return took + 5.0


@pytest.fixture
def http_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_nothing_listening_on_loopback_is_said_within_seconds(tmp_path, quick):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    picture = rgba_picture(tmp_path / "in.png")
    for command in (["info", "--timeout", "30"], ["refine", str(picture), "-o", str(tmp_path / "o.png")]):
        proc, took = timed(*command, "--endpoint", endpoint)
        assert_refused(proc, 1, f"nothing answers at {endpoint} — is `krita-sdxl serve` running?", "refused")
        assert took < quick, (command, took, quick)
    assert not (tmp_path / "o.png").exists()


def test_a_stale_ipc_socket_is_said_within_seconds(tmp_path, quick):
    path = tmp_path / "service.sock"
    with socket.socket(socket.AF_UNIX) as s:  # a service that died and left its socket file behind
        s.bind(str(path))
    proc, took = timed("info", "--endpoint", f"ipc://{path}", "--timeout", "30")
    assert_refused(proc, 1, f"nothing answers at ipc://{path}", "nothing listens on it")
    assert took < quick, (took, quick)


def test_a_host_name_that_does_not_resolve_is_said_as_such(quick):
    proc, took = timed("info", "--endpoint", "tcp://no-such-host.invalid:5588", "--timeout", "30")
    assert_refused(proc, 1, "'no-such-host.invalid'", "does not resolve")
    assert took < quick + 2, took  # the resolver's own answer may take a moment


def test_an_http_server_is_not_mistaken_for_a_curve_service(http_server, quick):
    proc, took = timed("info", "--endpoint", http_server, "--timeout", "30")
    line = assert_refused(proc, 1, f"something answers at {http_server}, but not a krita-sdxl service",
                          "HTTP server")  # fmt: skip
    assert "CURVE" not in line
    assert took < quick, (took, quick)


def test_a_slow_zeromq_service_still_gets_the_whole_timeout(ctx):
    """It completes the handshake and never answers: the command waits its --timeout, not the 2 s."""
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        proc, took = timed("info", "--endpoint", f"tcp://127.0.0.1:{port}", "--timeout", "4")
    finally:
        silent.close(linger=0)
    assert_refused(proc, 1, "no answer from", "within 4 s")
    assert took >= 4, took
