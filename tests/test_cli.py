"""The command line, as a user runs it: real subprocesses, real PNG files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image as PILImage

from krita_sdxl.backend.config import ConfigError, Settings, merge, resolve
from krita_sdxl.backend.launcher import start_service

CLI = [sys.executable, "-m", "krita_sdxl.backend.cli"]


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "in.png"
    im = PILImage.linear_gradient("L").resize((101, 67)).convert("RGBA")
    im.putalpha(PILImage.linear_gradient("L").resize((101, 67)))
    im.save(path)
    return path


def test_help_reads_well():
    out = run("--help").stdout
    for word in ("serve", "refine", "info", "demo", "keys", "examples:"):
        assert word in out
    serve = run("serve", "--help").stdout
    for flag in ("--model", "--demo", "--allow-download", "--device", "--dtype", "--config", "--endpoint"):
        assert flag in serve


def test_refine_local_writes_same_size_png_with_alpha(picture, tmp_path):
    out = tmp_path / "out.png"
    proc = run(
        "refine",
        str(picture),
        "--local",
        "--demo",
        "--prompt",
        "a hill",
        "--steps",
        "4",
        "--strength",
        "0.5",
        "--seed",
        "9",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "seed 9" in proc.stdout
    with PILImage.open(out) as res, PILImage.open(picture) as src:
        assert res.size == (101, 67)
        assert res.getchannel("A").tobytes() == src.getchannel("A").tobytes()


def test_refine_and_info_through_a_service_on_ipc(picture, tmp_path):
    svc = start_service(["--demo", "--log-level", "warning", "--endpoint", f"ipc://{tmp_path}/k.sock"])
    try:
        out = tmp_path / "out.png"
        proc = run(
            "refine", str(picture), "--endpoint", svc.endpoint, "--steps", "4", "--strength", "0.5", "-o", str(out)
        )
        assert proc.returncode == 0, proc.stderr
        assert PILImage.open(out).size == (101, 67)
        info = run("info", "--endpoint", svc.endpoint)
        assert info.returncode == 0, info.stderr
        assert "protocol    1" in info.stdout and "refine" in info.stdout
    finally:
        assert svc.stop() == 0


def test_refine_bad_field_and_no_service_give_clear_errors(picture, tmp_path):
    proc = run("refine", str(picture), "--local", "--demo", "--strength", "1.5", "-o", str(tmp_path / "x.png"))
    assert proc.returncode != 0 and "strength" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("info", "--endpoint", "tcp://127.0.0.1:9", "--timeout", "1")
    assert proc.returncode != 0 and "is `krita-sdxl serve` running" in proc.stderr


def test_settings_precedence_file_then_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[serve]\nendpoint = "tcp://127.0.0.1:6000"\ndevice = "cpu"\nheartbeat_timeout = 3\n')
    s = resolve(str(cfg), {"device": None, "dtype": "fp32"})
    assert (s.endpoint, s.device, s.dtype, s.heartbeat_timeout) == ("tcp://127.0.0.1:6000", "cpu", "fp32", 3.0)
    s = resolve(str(cfg), {"endpoint": "ipc:///tmp/x"})
    assert s.endpoint == "ipc:///tmp/x"
    with pytest.raises(ConfigError, match="unknown setting"):
        merge(Settings(), {"devise": "cpu"}, "c.toml")
    with pytest.raises(ConfigError, match="max_queue must be int"):
        merge(Settings(), {"max_queue": "many"}, "c.toml")
    cfg.write_text("[serve\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(str(cfg), {})


def test_bad_config_stops_serve_with_a_message(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[serve]\ncolour = "blue"\n')
    proc = run("serve", "--demo", "--config", str(cfg))
    assert proc.returncode == 2 and "unknown setting 'colour'" in proc.stderr
