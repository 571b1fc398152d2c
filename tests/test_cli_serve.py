"""``krita-sdxl serve`` refuses what cannot work before it loads the model, in one line, exit status 2.

"Before the model loads" is checked by giving each refused command an empty ``--cache-dir``: a demo
model load builds the demo model there, so the folder must still be empty afterwards.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cli_helpers import assert_refused, krita_sdxl, rgba_picture

from krita_sdxl.backend.cli.launcher import start_service


def refused_before_loading(tmp_path: Path, *args: str, status: int = 2, words: tuple[str, ...] = ()) -> str:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    proc = krita_sdxl("serve", "--demo", "--cache-dir", str(cache), *args, timeout=120)
    line = assert_refused(proc, status, *words)
    assert list(cache.iterdir()) == [], "the model was loaded before the problem was found"
    assert "ready on" not in proc.stdout
    return line


def test_a_port_in_use_is_reported_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused_before_loading(
            tmp_path, "--endpoint", f"tcp://127.0.0.1:{port}", words=("the port is in use", str(port))
        )


@pytest.mark.parametrize(
    "endpoint, extra, words",
    [
        ("127.0.0.1:5588", [], ("no scheme", "tcp://127.0.0.1:5588")),
        ("foo://bar", [], ("unknown scheme",)),
        ("tcp://127.0.0.1:0x10", [], ("port",)),
        ("tcp://0.0.0.0:5588", [], ("refusing to listen", "--curve-secret-key")),
        ("tcp://192.0.2.77:5588", ["--insecure"], ("192.0.2.77 is not an address of this machine",)),
        ("ipc:///nonexistent-folder/s.sock", [], ("does not exist",)),
    ],
)
def test_bad_addresses_are_refused_before_the_model_loads(tmp_path, endpoint, extra, words):
    refused_before_loading(tmp_path, "--endpoint", endpoint, *extra, words=words)


def test_a_second_service_on_the_same_ipc_socket_is_refused(tmp_path):
    sock = tmp_path / "one.sock"
    first = start_service(["--identity", "--endpoint", f"ipc://{sock}"])
    try:
        refused_before_loading(tmp_path, "--endpoint", f"ipc://{sock}", words=("another service is already",))
        info = krita_sdxl("info", "--endpoint", f"ipc://{sock}")
        assert info.returncode == 0 and "identity" in info.stdout, info.stderr  # the first one still serves
    finally:
        assert first.stop() == 0, first.log


def test_curve_without_its_files_is_refused_before_the_model_loads(tmp_path):
    refused_before_loading(tmp_path, "--curve-secret-key", str(tmp_path / "k"), words=("both",))
    refused_before_loading(
        tmp_path,
        "--curve-secret-key",
        str(tmp_path / "none.key_secret"),
        "--authorized-keys",
        str(tmp_path),
        words=("does not exist", "krita-sdxl keys"),
    )
    refused_before_loading(tmp_path, "--admin-keys", str(tmp_path / "no-such-folder"), words=("admin keys folder",))


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--heartbeat-timeout", "nan"], ("--heartbeat-timeout nan", "3 to 86400")),
        (["--heartbeat-timeout", "inf"], ("--heartbeat-timeout inf",)),
        (["--heartbeat-timeout", "-1"], ("--heartbeat-timeout -1",)),
        (["--max-pixels", str(2**63)], ("--max-pixels", "the protocol's limit")),
        (["--max-pixels", "20000x20000"], ("--max-pixels 400000000",)),
        (["--max-prompt-chars", "9000"], ("--max-prompt-chars", "4000")),
        (["--max-connections", "3"], ("--max-connections 3", "16 to")),
        (["--result-ttl", "1"], ("--result-ttl 1", "10 to")),
        (["--max-queue", "0"], ("--max-queue 0",)),
        (["--max-jobs-per-client", "-5"], ("--max-jobs-per-client -5",)),
        (["--tile-size", "100"], ("--tile-size 100", "multiple of 8")),
        (["--tile-overlap", "-1"], ("--tile-overlap",)),
        (["--device", "gpu"], ("--device gpu", "cuda:N")),
        (["--device", "cuda:99"], ("'cuda:99' is not available",)),
        (["--log-level", "loud"], ("--log-level", "invalid choice")),
        (["--max-queue", "many"], ("--max-queue", "invalid int value")),
    ],
)
def test_bad_settings_on_the_command_line(tmp_path, flags, words):
    refused_before_loading(tmp_path, *flags, words=words)


@pytest.mark.parametrize(
    "toml, words",
    [
        ("heartbeat_timeout = nan", ("heartbeat_timeout = nan", "3 to 86400")),
        ("heartbeat_timeout = -inf", ("heartbeat_timeout = -inf",)),
        ("max_pixels = 9223372036854775807", ("max_pixels", "the protocol's limit")),
        ('max_pixels = "20000x20000"', ("max_pixels = '20000x20000'",)),
        ('log_level = "loud"', ("log_level = 'loud'", "debug, info, warning, error")),
        ('device = "gpu"', ("device = 'gpu'",)),
        ('memory = "lots"', ("memory = 'lots'",)),
        ("max_queue = 0", ("max_queue = 0",)),
        ('max_queue = "many"', ("max_queue must be a whole number",)),
        ("demo = 1", ("demo must be true or false",)),
        ('endpoint = "127.0.0.1:5588"', ("no scheme",)),
        ('colour = "blue"', ("unknown setting 'colour'",)),
        ("[serve", ("not valid TOML",)),
    ],
)
def test_bad_settings_in_the_toml_file(tmp_path, toml, words):
    config = tmp_path / "config.toml"
    config.write_text(toml if toml.startswith("[") else f"[serve]\n{toml}\n")
    line = refused_before_loading(tmp_path, "--config", str(config), words=words)
    assert str(config) in line


def test_settings_precedence_file_then_flags(tmp_path):
    from krita_sdxl.backend.cli.main import build_parser
    from krita_sdxl.backend.cli.options import resolve

    cfg = tmp_path / "c.toml"
    cfg.write_text('[serve]\nendpoint = "tcp://127.0.0.1:6000"\ndevice = "cpu"\nheartbeat_timeout = 3\n')
    s = resolve(build_parser().parse_args(["serve", "--config", str(cfg), "--dtype", "fp32"]))
    assert (s.endpoint, s.device, s.dtype, s.heartbeat_timeout) == ("tcp://127.0.0.1:6000", "cpu", "fp32", 3.0)
    s = resolve(build_parser().parse_args(["serve", "--config", str(cfg), "--endpoint", "ipc:///tmp/x"]))
    assert s.endpoint == "ipc:///tmp/x"


def safetensors_bytes(header: str, payload: bytes) -> bytes:
    raw = header.encode()
    return len(raw).to_bytes(8, "little") + raw + payload


@pytest.mark.parametrize(
    "content, words",
    [
        (b"garbage, not a checkpoint" * 40, ("not a usable .safetensors checkpoint", "header")),
        (safetensors_bytes("{not json at all}", b""), ("not valid JSON",)),
        (
            safetensors_bytes('{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}', b"\0" * 100),
            ("cut short",),
        ),
    ],
)
def test_a_broken_checkpoint_is_refused_before_loading(tmp_path, content, words):
    ckpt = tmp_path / "refiner.safetensors"
    ckpt.write_bytes(content)
    proc = krita_sdxl("serve", "--model", str(ckpt), "--endpoint", "tcp://127.0.0.1:*", timeout=120)
    assert_refused(proc, 2, *words)
    picture = rgba_picture(tmp_path / "in.png")
    proc = krita_sdxl("refine", str(picture), "-o", str(tmp_path / "o.png"), "--local", "--model", str(ckpt))
    assert_refused(proc, 2, *words)
    assert not (tmp_path / "o.png").exists()
