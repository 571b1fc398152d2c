"""Downloading an upscaler model: ``krita-sdxl setup upscaler`` against a local HTTP server (tests/hf_server.py)
serving a tiny randomly initialised ESRGAN, and the docker's Download button (offscreen Qt) running that
same command: resumable, SHA-256 checked, only on a click, then the local backend's ``--upscaler``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # the docker's test (before any QApplication)

from cli_helpers import assert_refused, krita_sdxl
from hf_server import HubServer
from test_upscale import tiny_esrgan

from krita_sdxl.backend.setup.plan import events
from krita_sdxl.backend.setup.plan.upscalers import DEFAULT, UpscalerFile

REPO = "test/upscalers"
NAME = "tiny_x4.pth"


@pytest.fixture
def server(tmp_path_factory) -> Iterator[HubServer]:
    folder = tmp_path_factory.mktemp("served")
    tiny_esrgan(folder / NAME)
    with HubServer({REPO: folder}) as s:
        yield s


def catalogued(server: HubServer) -> UpscalerFile:
    data = server.state.repos[REPO][NAME].data
    url = f"{server.endpoint}/{REPO}/resolve/main/{NAME}"
    return UpscalerFile("Tiny x4", NAME, url, len(data), hashlib.sha256(data).hexdigest(), "test")


def cli(file: UpscalerFile, folder: Path) -> list[str]:
    return [sys.executable, "-m", "krita_sdxl.backend.cli", "setup", "upscaler", "--dir", str(folder),
            "--json-progress", *file.argv()]  # fmt: skip


def run(file: UpscalerFile, folder: Path) -> tuple[int, list[dict], str]:
    proc = subprocess.run(cli(file, folder), capture_output=True, text=True, timeout=120)
    return proc.returncode, [e for e in map(events.parse, proc.stdout.splitlines()) if e], proc.stdout + proc.stderr


def gets(server: HubServer) -> int:
    return sum(1 for method, path, _ in server.state.requests if method == "GET" and path.endswith(NAME))


def test_the_file_lands_verified_and_a_second_run_fetches_nothing(server, tmp_path):
    file = catalogued(server)
    code, found, out = run(file, tmp_path / "models")
    assert code == 0, out
    assert [e["event"] for e in found][:2] == ["plan", "file"] and found[-2:][0]["event"] == "verify"
    assert found[0]["needed"] == found[0]["total"] == file.size
    done = found[-1]
    assert done["event"] == "done" and Path(done["snapshot"]) == tmp_path / "models" / NAME
    assert (tmp_path / "models" / NAME).read_bytes() == server.state.repos[REPO][NAME].data
    assert not list((tmp_path / "models").glob("*.incomplete"))
    fetched = gets(server)
    code, again, out = run(file, tmp_path / "models")
    assert code == 0 and again[0]["needed"] == 0 and gets(server) == fetched, out
    from krita_sdxl.backend.engine.upscaler_model import load_upscaler

    assert load_upscaler(tmp_path / "models" / NAME).scale == 4  # what serve --upscaler loads


def test_an_interrupted_download_continues_where_it_stopped(server, tmp_path):
    file = catalogued(server)
    server.state.rate = 100_000  # bytes/s: the 0.9 MB file takes 9 s
    proc = subprocess.Popen(cli(file, tmp_path), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        event = events.parse(line) or {}
        if event.get("event") == "progress" and event["done"] > 200_000:
            break
    proc.kill()  # what the docker's Cancel does
    proc.wait()
    kept = (tmp_path / (NAME + ".incomplete")).stat().st_size
    assert 0 < kept < file.size
    server.state.rate = None
    code, found, out = run(file, tmp_path)
    assert code == 0, out
    assert found[0]["needed"] == file.size - kept and found[1]["resumed"] == kept
    assert f"bytes={kept}-" in server.ranges()
    assert (tmp_path / NAME).read_bytes() == server.state.repos[REPO][NAME].data


def test_a_damaged_download_is_refused_and_nothing_is_kept(server, tmp_path):
    file = catalogued(server)
    server.state.corrupt = {NAME}
    code, found, out = run(file, tmp_path)
    assert code == 1 and found[-1]["event"] == "error" and "SHA-256" in found[-1]["why"], out
    assert not list(tmp_path.iterdir())


def test_the_mistakes_people_make_with_another_file(tmp_path):
    base = ["setup", "upscaler", "--dir", str(tmp_path)]
    assert_refused(krita_sdxl(*base, "--url", "http://x/a.pth"), 2, "missing --name, --size, --sha256")
    args = ["--url", "http://x/a.pth", "--name", "a.pth", "--size", "10"]
    assert_refused(krita_sdxl(*base, *args, "--sha256", "abc"), 2, "64 hexadecimal digits")
    good = "0" * 64
    assert_refused(krita_sdxl(*base, *args[:2], "--name", "../a.pth", "--size", "10", "--sha256", good), 2, "file name")
    assert_refused(krita_sdxl(*base, "--url", "ftp://x/a.pth", *args[2:], "--sha256", good), 2, "http(s)")


def test_the_default_is_real_esrgan_x4plus_with_its_published_checksum():
    assert DEFAULT.url == "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth"
    assert DEFAULT.sha256 == "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1"
    assert DEFAULT.name == "RealESRGAN_x4plus.pth" and DEFAULT.size == 67_040_989


def test_the_dockers_download_button(app, ctx, server, tmp_path, monkeypatch):
    from test_plugin_panel import Docker, click, settle

    from krita_sdxl_refiner.workflow import upscaler_download

    file = catalogued(server)
    monkeypatch.setattr(upscaler_download, "DEFAULT", file)  # the catalogue entry, served here
    server.state.rate = 300_000  # slow enough to see progress
    d = Docker(app, ctx, connected=False)
    try:
        d.controller.update_settings(backend_command=sys.executable, setup_folder=str(tmp_path / "setup"))
        d.controller.setup.configure(tmp_path / "setup", False, "auto")
        assert not gets(server)  # nothing is downloaded before the click
        d.panel.open_settings()
        box = d.panel.dialog.upscaler
        box.show()
        settle()
        click(box.download)
        seen = []
        d.pump(lambda: seen.append(box.progress.value()) or d.controller.upscaler_download.phase != "running", 60)
        settle()
        assert d.controller.upscaler_download.phase == "done", box.status.text()
        assert any(0 < v < 1000 for v in seen)  # progress was shown on the way
        saved = tmp_path / "setup" / "models" / NAME
        assert saved.read_bytes() == server.state.repos[REPO][NAME].data
        assert d.controller.settings.upscaler_file == str(saved) and box.file.text() == str(saved)
        assert any("checksum verified" in m and "next start" in m for m in d.messages()), d.messages()
    finally:
        d.panel.dialog.close()
        d.close()


def test_spandrel_loads_upscalers_without_a_torchvision_that_fits(tmp_path):
    """spandrel imports torchvision for two architectures that are no upscalers; CI (and a CPU PyTorch beside
    the CUDA torchvision) has none that imports: the backend stands in for it while spandrel imports, only."""
    import importlib.util

    from krita_sdxl.backend.engine.upscaler_model import load_upscaler

    had = "torchvision" in sys.modules
    model = load_upscaler(tiny_esrgan(tmp_path / "x4.pth"))
    assert model.describe() == {"name": "x4.pth", "architecture": "ESRGAN", "scale": 4}
    assert ("torchvision" in sys.modules) == had or importlib.util.find_spec("torchvision") is not None
