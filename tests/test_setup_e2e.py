"""Set up from the docker, end to end, offscreen: a person clicks the docker's Set up…, Check, Set up,
Cancel, Update and Show log; the real steps run in a temporary folder with real processes: a venv from
a Python found on this machine, ``pip install torch==2.13.0`` and the backend wheel the plugin zip
carries (packages from this machine's configured pip index), the demo refiner downloaded from a local
server in the Hugging Face layout under the real repo id (``HF_ENDPOINT``), then ``krita-sdxl serve``
from that venv as the managed local backend, and a refine through it.

One venv serves the module (cancel, set up, refine, update); a second folder shows a failing pip step.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import krita_harness
import pytest
from hf_server import HubServer

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PyQt5.QtWidgets")
zmq = pytest.importorskip("zmq")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))

from test_setup_view import Docker, click, path_without_krita_sdxl  # noqa: E402

from krita_sdxl.backend.setup.plan import VERSION, hub, steps  # noqa: E402

pytestmark = [pytest.mark.slow]
SETUP_TIMEOUT_S = 480  # venv + torch + the backend's packages on a busy 2-core machine: about 2 minutes
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, demo_models) -> Iterator[dict]:
    """The plugin zip installed as Krita would, the Hub server, the environment Krita would start with."""
    tmp = tmp_path_factory.mktemp("setup-e2e")
    build_plugin = krita_harness.load_build_plugin()
    zip_path = build_plugin.build(tmp / "dist" / "krita_sdxl_refiner.zip", vendor=False)
    krita_harness.install_plugin_zip(zip_path, tmp / "resources")
    wheel = tmp / "resources" / "pykrita" / "krita_sdxl_refiner" / steps.WHEELS_DIR / steps.wheel_name()
    assert wheel.is_file()
    with HubServer({hub.REFINER_REPO: demo_models.refiner}) as server, pytest.MonkeyPatch.context() as mp:
        env = {
            "HF_ENDPOINT": server.endpoint,
            "HF_HOME": str(tmp / "hf"),
            "KRITA_SDXL_TORCH_INDEX": "pip",  # this machine's pip config: the pinned CPU torch from local disk
            steps.BACKEND_WHEEL_ENV: str(wheel),  # the wheel as the zip carries it (the plugin runs from source)
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PATH": path_without_krita_sdxl(),  # a fresh computer: no krita-sdxl command
        }
        for key, value in env.items():
            mp.setenv(key, value)
        yield {"tmp": tmp, "server": server, "folder": tmp / "backend", "mp": mp}
    print("setup timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items()))


def docker(app, ctx, world: dict) -> Docker:
    d = Docker(app, ctx, world["tmp"])
    d.folder = world["folder"]
    return d


def plain(html: str) -> str:
    """What a rich-text label shows."""
    from PyQt5.QtGui import QTextDocument

    doc = QTextDocument()
    doc.setHtml(html)
    return doc.toPlainText()


def local_endpoint() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_cancel_while_the_venv_is_made_leaves_nothing_behind(app, ctx, world) -> None:
    d = docker(app, ctx, world)
    try:
        d.open_setup()
        click(app, d.setup.run_button)
        runner = d.controller.setup
        venv = d.folder / "venv"
        d.pump(lambda: (venv / "pyvenv.cfg").exists() or runner.phase in ("failed", "done"), timeout=60)
        assert runner.status.get("venv") == "running", runner.describe()
        click(app, d.setup.cancel_button)
        d.pump(lambda: runner.phase == "cancelled", timeout=30)
        assert runner.status["venv"] == "cancelled" and not venv.exists()  # rolled back
        assert "venv" not in steps.read_state(d.folder)
        assert "“Create the Python environment” was not finished" in d.setup.message.text()
        assert "== Create the Python environment" in (d.folder / steps.LOG_FILE).read_text()
        assert d.setup.run_button.text() == "Set up" and d.setup.run_button.isEnabled()
    finally:
        d.close()


def test_set_up_installs_downloads_starts_and_refines(app, ctx, world) -> None:
    d = docker(app, ctx, world)
    endpoint = local_endpoint()
    d.controller.update_settings(endpoint=endpoint)
    try:
        d.open_setup()
        click(app, d.setup.check_button)
        runner = d.controller.setup
        d.pump(lambda: runner.phase != "checking", timeout=60)
        assert runner.phase == "ready" and "torch==2.13.0" in d.setup.plan.toPlainText()
        started = time.monotonic()
        click(app, d.setup.run_button)
        seen: set[str] = set()

        def finished() -> bool:
            seen.update(k for k, v in runner.status.items() if v == "running")
            if runner.status.get("models") == "running" and runner.progress:
                seen.add("bytes")
            return runner.phase in ("done", "failed", "cancelled")

        d.pump(finished, timeout=SETUP_TIMEOUT_S)
        TIMES["set up"] = time.monotonic() - started
        assert runner.phase == "done", f"{runner.describe()}\n{runner.log_text(6000)}"
        assert seen >= {"venv", "torch", "backend", "models", "service"}
        assert set(runner.status.values()) == {"done"}
        python = steps.venv_python(d.folder / "venv", "Linux")
        assert d.controller.settings.backend_command == python and d.controller.settings.backend_args == "serve"
        assert steps.is_set_up(d.folder) and d.setup.run_button.text() == "Update"
        assert "The local backend is set up and running" in d.setup.message.text()
        assert d.controller.backend.state.value == "running"

        d.pump(lambda: d.controller.client.is_connected, timeout=60)
        caps = d.controller.client.capabilities
        assert caps["backend_version"] == VERSION and d.controller.backend_mismatch is None
        assert [(m["name"], m["source"]) for m in caps["models"] if m["role"] == "refiner"] == [
            (hub.REFINER_REPO, "hub")
        ]
        assert d.panel.backend_button.text() == "■ Stop"
        click(app, d.panel.refine_button)
        d.pump(lambda: bool(d.adapter.applied) or any(j.state.finished for j in d.controller.jobs), 120)
        assert len(d.adapter.applied) == 1, [j.status_text for j in d.controller.jobs]
        box, data, _name = d.adapter.applied[0]
        assert len(data) == box.width * box.height * 4
    finally:
        d.close()


def test_update_runs_only_what_is_not_done(app, ctx, world) -> None:
    d = docker(app, ctx, world)
    d.controller.update_settings(endpoint=local_endpoint())
    try:
        d.open_setup()
        assert d.setup.run_button.text() == "Update"
        log = d.folder / steps.LOG_FILE
        before = log.stat().st_size
        started = time.monotonic()
        click(app, d.setup.run_button)
        runner = d.controller.setup
        d.pump(lambda: runner.phase in ("done", "failed", "cancelled"), timeout=180)
        TIMES["update"] = time.monotonic() - started
        assert runner.phase == "done", runner.log_text(4000)
        assert runner.plan is not None and [s.key for s in runner.plan.pending] == ["service"]
        added = log.read_text()[before:]
        assert [line for line in added.splitlines() if line.startswith("$ ")] == []  # no command ran
        assert "== Start the backend" in added and "== Install" not in added
        d.pump(lambda: d.controller.client.is_connected, timeout=60)
    finally:
        d.close()


def test_a_failing_pip_step_says_which_why_and_what_to_do(app, ctx, world, tmp_path) -> None:
    mp = world["mp"]
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    mp.setenv("PIP_NO_INDEX", "1")  # as offline as it gets: pip finds no torch anywhere
    mp.setenv("PIP_FIND_LINKS", str(empty))
    try:
        d = docker(app, ctx, world)
        d.folder = tmp_path / "other-backend"
        try:
            d.open_setup()
            click(app, d.setup.run_button)
            runner = d.controller.setup
            d.pump(lambda: runner.phase in ("done", "failed", "cancelled"), timeout=180)
            assert runner.phase == "failed" and runner.failure is not None
            assert runner.failure.step == "Install PyTorch 2.13.0 (CPU only)"
            # pip says "no matching distribution", or with a constraints file (as here) "conflicting dependencies"
            assert "torch==2.13.0" in runner.failure.why and runner.failure.why.startswith("pip ")
            assert "online" in runner.failure.what and "click Repair" in runner.failure.what
            message = plain(d.setup.message.text())
            assert f"Install PyTorch 2.13.0 (CPU only)” failed: {runner.failure.why}" in message
            assert str(d.folder / steps.LOG_FILE) in message
            assert runner.status["venv"] == "done" and runner.status["torch"] == "failed"
            assert set(steps.read_state(d.folder)) == {"venv"}  # the venv stays; the torch step is redone
            click(app, d.setup.log_button)
            shown = d.setup.log.toPlainText()
            assert d.setup.log.isVisible() and "$ " in shown and "ERROR:" in shown and "torch==2.13.0" in shown
        finally:
            d.close()
    finally:
        mp.delenv("PIP_NO_INDEX")
        mp.delenv("PIP_FIND_LINKS")
