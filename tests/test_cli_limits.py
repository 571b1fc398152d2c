"""``krita-sdxl refine`` checks what the service takes before it decodes or sends a pixel: the picture's size
from its header, against the protocol and the limits the service announces in ``welcome``; and text that is
not UTF-8. Exit status 2 and one line, never a traceback."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
from cli_helpers import assert_refused, jobs_seen, krita_sdxl, rgba_picture

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import ServiceProcess, start_service


@pytest.fixture(scope="module")
def service() -> ServiceProcess:
    svc = start_service(["--identity", "--max-pixels", "100x100", "--max-prompt-chars", "100", "--log-level", "info"])
    yield svc
    svc.stop()


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` and carries a few bytes of pixels: only its header can be read
    (decoding it would fail, so a refusal that names the size proves nothing was decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def test_welcome_announces_the_limits(service):
    with ServiceClient(service.endpoint, timeout=10) as client:
        limits = client.hello()["capabilities"]["limits"]
    assert limits["max_pixels"] == 100 * 100 and limits["max_prompt_chars"] == 100
    info = krita_sdxl("info", "--endpoint", service.endpoint)
    assert "pictures up to 10,000 pixels, prompts up to 100 characters" in info.stdout, info.stdout


@pytest.mark.parametrize(
    "size, words",
    [
        ((12000, 12000), ("12000x12000 = 144000000 pixels", "accepts at most 10000 (100x100)")),
        ((20000, 20000), ("20000x20000 pixels", "16384 px a side")),  # Pillow's DecompressionBombError before
        ((120, 90), ("120x90 = 10800 pixels", "accepts at most 10000")),
    ],
)
def test_a_picture_too_large_is_refused_from_its_header(service, tmp_path, size, words):
    picture = png_header(tmp_path / "big.png", *size)
    before = jobs_seen(service.log)
    proc = krita_sdxl("refine", str(picture), "--endpoint", service.endpoint, "-o", str(tmp_path / "o.png"))
    assert_refused(proc, 2, str(picture), *words)
    assert jobs_seen(service.log) == before and "limit" not in service.log[-2000:]  # nothing reached the service
    assert not (tmp_path / "o.png").exists()


def test_a_real_picture_over_the_limit_and_a_work_size_over_it(service, tmp_path):
    picture = rgba_picture(tmp_path / "in.png", 101, 100)
    out = ["--endpoint", service.endpoint, "-o", str(tmp_path / "o.png")]
    assert_refused(krita_sdxl("refine", str(picture), *out), 2, "101x100 = 10100 pixels", "at most 10000")
    small = rgba_picture(tmp_path / "small.png", 64, 64)
    assert_refused(krita_sdxl("refine", str(small), *out, "--work-size", "128x128"), 2, "--work-size 128x128",
                   "16384 pixels")  # fmt: skip
    assert krita_sdxl("refine", str(small), *out).returncode == 0


def test_a_prompt_longer_than_the_service_takes(service, tmp_path):
    picture = rgba_picture(tmp_path / "in.png", 32, 32)
    out = ["--endpoint", service.endpoint, "-o", str(tmp_path / "o.png")]
    assert_refused(krita_sdxl("refine", str(picture), *out, "--prompt", "x" * 101), 2, "--prompt is 101 characters",
                   "the limit is 100")  # fmt: skip
    assert_refused(krita_sdxl("refine", str(picture), *out, "--negative-prompt", "y" * 500), 2,
                   "--negative-prompt is 500 characters")  # fmt: skip


@pytest.mark.parametrize("flag", ["--prompt", "--negative-prompt"])
def test_a_prompt_that_is_not_utf8_is_refused_in_one_line(service, tmp_path, flag):
    picture = rgba_picture(tmp_path / "in.png", 32, 32)
    proc = krita_sdxl("refine", str(picture), "--endpoint", service.endpoint, "-o", str(tmp_path / "o.png"), flag,
                      b"caf\xe9 au lait".decode("utf-8", "surrogateescape"))  # fmt: skip
    assert_refused(proc, 2, flag, "not valid UTF-8", "0xe9 at character 4")


def test_a_file_name_that_is_not_utf8_is_printed_not_a_traceback(service, tmp_path):
    """The result is written under the name as given, and the summary prints it escaped (strict stdout)."""
    picture = rgba_picture(tmp_path / "in.png", 32, 32)
    name = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")
    proc = krita_sdxl("refine", str(picture), "--endpoint", service.endpoint, "-o", name,
                      env={"PYTHONIOENCODING": "utf-8:strict"})  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "caf\\udce9.png" in proc.stdout and os.path.exists(name)
