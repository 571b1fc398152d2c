"""Endpoint parsing and the ipc ownership rules (protocol/endpoint.py), with real Unix sockets."""

from __future__ import annotations

import os
import socket

import pytest

from krita_sdxl.protocol.endpoint import (
    EndpointError,
    check_ipc_bind,
    check_ipc_connect,
    default_ipc_dir,
    parse_endpoint,
)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("127.0.0.1:5588", "did you mean tcp://127.0.0.1:5588"),
        ("foo://bar", "unknown scheme 'foo'"),
        ("", "empty"),
        ("tcp://127.0.0.1", "host and a port"),
        ("tcp://127.0.0.1:99999", "not a number from 1 to 65535"),
        ("tcp://127.0.0.1:*", "only works when listening"),
        ("tcp://::1:5588", "brackets"),
        ("tcp://127.0.0.1:5588/x", "no path"),
        ("ipc://", "nothing after"),
        ("ipc:///" + "x" * 200, "the limit is"),
    ],
)
def test_bad_endpoints_name_the_problem(text: str, needle: str) -> None:
    with pytest.raises(EndpointError, match=needle.replace("*", r"\*").replace("(", r"\(")):
        parse_endpoint(text)


def test_good_endpoints() -> None:
    assert parse_endpoint(" tcp://127.0.0.1:05588 ").text == "tcp://127.0.0.1:5588"
    assert parse_endpoint("tcp://127.0.0.1:*", bind=True).port == "*"
    assert parse_endpoint("tcp://[::1]:5588").is_local
    assert not parse_endpoint("tcp://0.0.0.0:5588").is_local
    assert not parse_endpoint("tcp://example.org:5588").is_local
    assert parse_endpoint("ipc:///tmp/x.sock").path is not None
    private = parse_endpoint("ipc")
    assert private.scheme == "ipc" and private.path.parent == default_ipc_dir(create=False)


def test_default_ipc_dir_is_private(tmp_path, monkeypatch) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    folder = default_ipc_dir()
    assert folder == runtime / "krita-sdxl"
    assert os.stat(folder).st_mode & 0o777 == 0o700
    os.chmod(runtime, 0o777)  # a runtime folder others can write to is not used
    assert default_ipc_dir(create=False).parent != runtime


def _listen(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def test_bind_refuses_a_live_socket_and_allows_a_stale_one(tmp_path) -> None:
    path = tmp_path / "s.sock"
    ep = parse_endpoint(f"ipc://{path}")
    check_ipc_bind(ep)  # nothing there yet
    live = _listen(path)
    with pytest.raises(EndpointError, match="already listening"):
        check_ipc_bind(ep)
    check_ipc_connect(ep)  # ours: a client may connect
    live.close()  # the file stays behind: stale
    check_ipc_bind(ep)


def test_bind_in_a_missing_folder(tmp_path) -> None:
    with pytest.raises(EndpointError, match="does not exist"):
        check_ipc_bind(parse_endpoint(f"ipc://{tmp_path}/nope/s.sock"))


def test_connect_needs_an_existing_socket(tmp_path) -> None:
    with pytest.raises(EndpointError, match="no service is listening"):
        check_ipc_connect(parse_endpoint(f"ipc://{tmp_path}/s.sock"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a socket owned by another user")
def test_a_socket_of_another_user_is_refused_both_ways(tmp_path) -> None:
    path = tmp_path / "s.sock"
    live = _listen(path)
    os.chown(path, 65534, 65534)  # nobody: a squatter
    ep = parse_endpoint(f"ipc://{path}")
    try:
        with pytest.raises(EndpointError, match="belongs to"):
            check_ipc_connect(ep)
        with pytest.raises(EndpointError, match="belongs to"):
            check_ipc_bind(ep)
    finally:
        live.close()
