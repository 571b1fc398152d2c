"""The settings file as people write it: refine and info read their ``[client]`` table (or ``[serve]``'s
endpoint, so one file configures both on one machine), and a misspelled table is refused like a misspelled key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq
from cli_helpers import assert_refused, krita_sdxl, rgba_picture

from krita_sdxl.backend.cli.launcher import ServiceProcess, start_service


@pytest.fixture(scope="module")
def service() -> ServiceProcess:
    svc = start_service(["--identity"])
    yield svc
    svc.stop()


def home_config(tmp_path: Path, text: str) -> dict[str, str]:
    """``text`` as the default settings file ($XDG_CONFIG_HOME/krita-sdxl/config.toml); the environment to run in."""
    folder = tmp_path / "config" / "krita-sdxl"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(text)
    return {"XDG_CONFIG_HOME": str(tmp_path / "config")}


def test_info_and_refine_use_the_serve_endpoint_of_the_settings_file(service, tmp_path):
    env = home_config(tmp_path, f'[serve]\nendpoint = "{service.endpoint}"\n')
    info = krita_sdxl("info", env=env)
    assert info.returncode == 0, info.stderr
    assert f"at {service.endpoint}" in info.stdout
    picture, out = rgba_picture(tmp_path / "in.png"), tmp_path / "out.png"
    refine = krita_sdxl("refine", str(picture), "-o", str(out), env=env)
    assert refine.returncode == 0, refine.stderr
    assert out.is_file()


def test_the_client_table_wins_over_serve_and_flags_win_over_both(service, tmp_path):
    gone = tmp_path / "gone.sock"
    env = home_config(tmp_path, f'[serve]\nendpoint = "ipc://{gone}"\n\n[client]\nendpoint = "{service.endpoint}"\n')
    info = krita_sdxl("info", env=env)
    assert info.returncode == 0 and f"at {service.endpoint}" in info.stdout, info.stderr
    flag = krita_sdxl("info", "--endpoint", f"ipc://{gone}", env=env)
    assert_refused(flag, 1, str(gone))  # the flag was used: that socket does not exist
    other = tmp_path / "other.toml"
    other.write_text(f'[client]\nendpoint = "ipc://{gone}"\n')
    assert_refused(krita_sdxl("info", "--config", str(other), env=env), 1, str(gone))  # --config replaces the default


def test_the_client_timeout_comes_from_the_file(tmp_path, ctx):
    """A ZeroMQ peer that never answers: the wait is the [client] timeout, not info's 5 s."""
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        env = home_config(tmp_path, f'[client]\nendpoint = "tcp://127.0.0.1:{port}"\ntimeout = 1\n')
        t0 = time.monotonic()
        proc = krita_sdxl("info", env=env)
        elapsed = time.monotonic() - t0
    finally:
        silent.close(linger=0)
    assert_refused(proc, 1, f"tcp://127.0.0.1:{port}", "1 s")
    assert elapsed < 4.5, elapsed


def test_key_files_in_the_client_table_are_found_beside_the_file(tmp_path, make_ctx):
    folder = tmp_path / "config" / "krita-sdxl"
    keys = folder / "keys"
    for name in ("server", "laptop"):
        assert krita_sdxl("keys", "--dir", str(keys), "--name", name).returncode == 0
    (keys / "clients").mkdir()
    assert krita_sdxl("authorize", str(keys / "laptop.key"), "--dir", str(keys / "clients")).returncode == 0
    svc = start_service(["--identity", "--curve-secret-key", str(keys / "server.key_secret"),
                         "--authorized-keys", str(keys / "clients")])  # fmt: skip
    try:
        env = home_config(tmp_path, f'[client]\nendpoint = "{svc.endpoint}"\nserver_key = "keys/server.key"\n'
                                    'client_key = "keys/laptop.key_secret"\n')  # fmt: skip
        info = krita_sdxl("info", cwd=str(tmp_path), env=env)  # run elsewhere: the names are the file's
        assert info.returncode == 0, info.stderr
        (folder / "config.toml").write_text(f'[client]\nendpoint = "{svc.endpoint}"\nserver_key = "keys/server.key"\n')
        assert_refused(krita_sdxl("info", env=env), 2, "CURVE needs both", "server_key in", "--client-key")
    finally:
        svc.stop()


@pytest.mark.parametrize(
    "text, words",
    [
        ('[serv]\nendpoint = "ipc"\n', ("unknown table [serv]", "did you mean [serve]?", "[client], [serve]")),
        ('[clients]\nendpoint = "ipc"\n', ("unknown table [clients]", "did you mean [client]?")),
        ('[server.options]\ndevice = "cpu"\n', ("unknown table [server]", "did you mean [serve]?")),
        ("[gpu]\nx = 1\n", ("unknown table [gpu]; known: [client], [serve]",)),
        ('endpoint = "ipc"\n', ("endpoint = 'ipc' is outside any table", "[serve]", "[client]")),
        ('[client]\nendpiont = "ipc"\n', ("[client]: unknown setting 'endpiont' (did you mean 'endpoint'?)",)),
        ("[client]\ntimeout = -1\n", ("[client]: timeout = -1", "above 0")),
        ('[client]\ntimeout = "soon"\n', ("timeout must be a number",)),
        ('[client]\nendpoint = "127.0.0.1:5588"\n', ("[client]: endpoint", "did you mean tcp://127.0.0.1:5588?")),
        ('[serve]\nendpoint = "tcp://127.0.0.1:*"\n', ("picks a free port", "[client]")),
        ("[[serve]]\n", ("[serve] must be a table",)),
    ],
)
def test_a_mistake_in_the_file_is_refused_in_one_line(tmp_path, text, words):
    env = home_config(tmp_path, text)
    line = assert_refused(krita_sdxl("info", env=env), 2, *words)
    assert "config.toml" in line
    if "table" in words[0]:  # serve reads the same file, and refuses the same
        assert_refused(krita_sdxl("serve", "--identity", env=env), 2, *words)


def test_a_wildcard_serve_endpoint_is_reached_on_loopback():
    from krita_sdxl.backend.cli.options import reachable_endpoint
    from krita_sdxl.backend.common.config import ConfigError

    assert reachable_endpoint("tcp://0.0.0.0:6000", "f") == "tcp://127.0.0.1:6000"
    assert reachable_endpoint("tcp://*:6000", "f") == "tcp://127.0.0.1:6000"
    assert reachable_endpoint("tcp://[::]:6000", "f") == "tcp://[::1]:6000"
    assert reachable_endpoint("tcp://192.168.1.5:6000", "f") == "tcp://192.168.1.5:6000"
    with pytest.raises(ConfigError, match="picks a free port"):
        reachable_endpoint("tcp://127.0.0.1:*", "f")
