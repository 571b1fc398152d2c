"""The docker's setup section, offscreen, clicked with the mouse: the docker offers Set up… until a
backend exists; Check looks at this computer (real Pythons probed, real nvidia-smi if there is one)
and shows what Set up will do and download, writing nothing; a full disk blocks Set up with the
reason; a backend of another version asks for an update. The whole flow: test_setup_e2e.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PyQt5.QtWidgets")
zmq = pytest.importorskip("zmq")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))

from plugin_fakes import FakeAdapter, FakeService, make_controller, pump  # noqa: E402
from PyQt5.QtCore import Qt  # noqa: E402
from PyQt5.QtTest import QTest  # noqa: E402

from krita_sdxl.backend.setup.plan import VERSION, hub, space, steps  # noqa: E402
from krita_sdxl_refiner.ui.panel import RefinerPanel  # noqa: E402


def click(app, widget) -> None:
    pump(app, lambda: True, [], 1)
    assert widget.isVisible() and widget.isEnabled(), widget.text()
    QTest.mouseClick(widget, Qt.LeftButton)
    pump(app, lambda: True, [], 1)


def path_without_krita_sdxl() -> str:
    """PATH as on a fresh computer: no krita-sdxl command (an activated dev venv has one)."""
    entries = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(p for p in entries if p and not (Path(p) / "krita-sdxl").exists())


def type_into(line_edit, text: str) -> None:
    """Type over the field (no Enter: in the dialog, Enter is OK)."""
    line_edit.setFocus()
    line_edit.selectAll()
    QTest.keyClicks(line_edit, text)


class Docker:
    def __init__(self, app, ctx, tmp_path: Path, service: FakeService | None = None) -> None:
        self.app = app
        self.service = service
        self.adapter = FakeAdapter()
        endpoint = service.endpoint if service else "tcp://127.0.0.1:9"
        self.controller = make_controller(ctx, endpoint, self.adapter)
        self.panel = RefinerPanel(self.controller)
        self.panel.show()
        self.controller.start()
        self.setup = self.panel.dialog.setup
        self.folder = tmp_path / "backend"

    def pump(self, until, timeout: float = 60.0) -> None:
        pump(self.app, until, [self.service] if self.service else [], timeout)

    def open_setup(self) -> None:
        assert self.panel.backend_button.text() == "Set up…"
        click(self.app, self.panel.backend_button)
        assert self.panel.dialog.isVisible() and self.setup.isVisible()
        type_into(self.setup.folder, str(self.folder))
        QTest.keyClick(self.setup.folder, Qt.Key_Tab)  # on to the next field, as a person does: the folder is read

    def close(self) -> None:
        self.controller.shutdown()
        self.panel.dialog.close()
        self.panel.close()


@pytest.fixture
def docker(app, ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("KRITA_SDXL_TORCH_INDEX", "pip")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("PATH", path_without_krita_sdxl())
    wheel = tmp_path / steps.wheel_name()  # as if the plugin came from the zip (only read for its checksum here)
    wheel.write_bytes(b"wheel")
    monkeypatch.setenv(steps.BACKEND_WHEEL_ENV, str(wheel))
    d = Docker(app, ctx, tmp_path)
    yield d
    d.close()


def test_check_shows_the_plan_and_writes_nothing(docker) -> None:
    d = docker
    d.open_setup()
    assert d.controller.settings.setup_folder == ""  # typed, not saved: Check saves nothing
    assert "nothing runs before you click Set up" in d.setup.plan.toPlainText()
    assert not d.setup.repair_button.isEnabled()  # nothing set up yet: nothing to repair
    click(d.app, d.setup.check_button)
    d.pump(lambda: d.controller.setup.phase not in ("checking",))
    runner = d.controller.setup
    assert runner.phase == "ready", (runner.problem and runner.problem.why, runner.facts)
    text = d.setup.plan.toPlainText()
    assert f"Python {sys.version_info[0]}." in text and "torch==2.13.0 from pip" in text
    assert "Create the Python environment" in text and "Download the SDXL 1.0 refiner" in text
    assert f"about {space.human(hub.REFINER.approx_bytes)}" in text and "In all it downloads about" in text
    assert not d.folder.exists() and runner.folder == d.folder  # Check writes nothing, in the folder typed
    assert d.setup.run_button.text() == "Set up" and d.setup.run_button.isEnabled()
    assert not d.setup.repair_button.isEnabled()
    before = runner.plan.download_bytes
    click(d.app, d.setup.base)  # the base too: more to download, shown at once
    assert runner.plan.download_bytes == before + hub.BASE.approx_bytes and not d.controller.settings.setup_base
    assert "SDXL 1.0 refiner and SDXL 1.0 base" in d.setup.plan.toPlainText()
    plan_fits_without_scrolling(d)
    click(d.app, d.panel.dialog.ok_button)  # OK saves the folder and the options
    assert d.controller.settings.setup_folder == str(d.folder) and d.controller.settings.setup_base


def plan_fits_without_scrolling(d) -> None:
    """Every line of the plan is shown, its totals included, with no scroll bar inside it and no empty
    rows under it (the dialog scrolls as a whole when the screen is short)."""
    plan = d.setup.plan
    d.pump(lambda: True, timeout=0.2)
    lines = plan.toPlainText().splitlines()
    assert len(lines) >= 10 and lines[-1].startswith("Disk space it needs"), lines
    assert plan.verticalScrollBar().maximum() == 0, (plan.height(), plan.document().size().height())
    assert plan.height() >= plan.document().size().height()
    assert not d.setup.steps.isVisible() and not d.setup.message.isVisible() and not d.setup.detail.isVisible()


def test_a_full_disk_blocks_set_up_with_the_reason(docker, monkeypatch) -> None:
    d = docker
    d.open_setup()
    monkeypatch.setattr(space, "free_bytes", lambda path: 2_000_000_000)  # 2 GB free: not enough
    click(d.app, d.setup.run_button)  # checks first, then refuses before writing anything
    d.pump(lambda: d.controller.setup.phase in ("blocked", "running", "failed"))
    assert d.controller.setup.phase == "blocked"
    text = d.setup.plan.toPlainText()
    assert "Not enough disk space" in text and "2.00 GB is free" in text and "choose another folder" in text
    assert not d.setup.run_button.isEnabled() and not d.folder.exists()


def test_the_docker_offers_start_when_krita_sdxl_is_installed(app, ctx, tmp_path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "krita-sdxl").write_text("#!/bin/sh\n")
    (bin_dir / "krita-sdxl").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), path_without_krita_sdxl()]))
    d = Docker(app, ctx, tmp_path)
    try:
        assert d.panel.backend_button.text() == "▶ Start"  # the default command exists: nothing to set up
    finally:
        d.close()


def test_a_backend_of_another_version_asks_for_an_update(app, ctx, tmp_path) -> None:
    service = FakeService(ctx)
    service.caps = {**service.caps, "backend_version": "0.0.1"}
    d = Docker(app, ctx, tmp_path, service)
    try:
        d.pump(lambda: d.controller.client.is_connected, timeout=5)
        texts = lambda: " ".join(text for _level, text in d.panel.messages.entries)  # noqa: E731
        d.pump(lambda: "0.0.1" in texts(), timeout=5)
        assert f"version 0.0.1, this plugin {VERSION}" in texts()
        assert "Update" in d.setup.message.text()
    finally:
        d.close()
        service.close()


@pytest.mark.skipif(os.name != "posix", reason="the fake environment's python is a shell script")
def test_update_stops_the_running_backend_first_then_starts_the_environments(docker, tmp_path) -> None:
    """All steps recorded as done: Update stops the backend Krita runs (its files could be replaced),
    runs nothing else, and starts the environment's ``python -m krita_sdxl.backend.cli serve``."""
    d = docker
    d.open_setup()
    click(d.app, d.panel.dialog.apply_button)  # the folder saved, the dialog stays
    click(d.app, d.setup.check_button)
    runner = d.controller.setup
    d.pump(lambda: runner.phase != "checking")
    assert runner.plan is not None
    # a finished setup, faked: the venv's python (a script that serves), the state file, the model cache
    python = Path(runner.plan.python)
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/started"\necho "ready on tcp://x"\nexec sleep 30\n')
    python.chmod(0o755)
    steps.write_state(d.folder, {s.key: s.fingerprint for s in runner.plan.steps if s.fingerprint})
    snap = hub.repo_folder(tmp_path / "hf" / "hub", hub.REFINER_REPO) / "snapshots" / "c0"
    for name in ("model_index.json", "unet/w.safetensors", "vae/w.safetensors"):
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text("{}")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("c0")
    old = tmp_path / "old-backend"
    old.write_text('#!/bin/sh\necho "ready on tcp://y"\nexec sleep 30\n')
    old.chmod(0o755)
    d.controller.update_settings(backend_command=str(old), backend_args="serve")
    d.controller.start_backend()
    d.pump(lambda: d.controller.backend.state.value == "running", timeout=10)
    d.setup.show_settings()  # the view reads the folder's state again: Update
    assert d.setup.run_button.text() == "Update" and d.setup.repair_button.isEnabled()

    click(d.app, d.setup.run_button)
    d.pump(lambda: runner.phase in ("done", "failed", "cancelled"), timeout=30)
    assert runner.phase == "done", runner.log_text()
    assert [s.key for s in runner.plan.pending] == ["service"]
    log = runner.log_text()
    assert "Stopping the running backend first." in log and "\n$ " not in log
    assert d.controller.settings.backend_command == str(python)
    assert (python.parent / "started").read_text().startswith("-m krita_sdxl.backend.cli serve --endpoint")
    assert d.controller.backend.state.value == "running"


@pytest.mark.skipif(os.name != "posix", reason="the fake backend is a shell script")
def test_a_backend_started_when_the_last_one_stopped_is_not_orphaned(app, tmp_path) -> None:
    """A listener of ``stopped`` that starts the next backend at once (as Update does) must get it
    running: the old process was cleared after the signal, dropping the new one."""
    from krita_sdxl_refiner.adapters.backend import Backend

    fake = tmp_path / "fake-serve"
    fake.write_text('#!/bin/sh\necho "ready on tcp://x"\nexec sleep 30\n')
    fake.chmod(0o755)
    backend = Backend()
    starts: list[str] = []

    def restart(state: str, _detail: str) -> None:
        if state == "stopped" and not starts:
            starts.append(state)
            backend.start(str(fake), "serve", "tcp://127.0.0.1:9")

    backend.start(str(fake), "serve", "tcp://127.0.0.1:9")
    pump(app, lambda: backend.state.value == "running", [], 10)
    backend.state_changed.connect(restart)
    backend.stop()
    pump(app, lambda: bool(starts) and backend.state.value == "running", [], 10)
    backend.kill()


@pytest.mark.parametrize(
    "python",
    [
        r"C:\Users\ann\AppData\Roaming\krita\krita-sdxl-backend\venv\Scripts\python.exe",  # Windows
        "/Users/ann/Library/Application Support/krita/krita-sdxl-backend/venv/bin/python",  # macOS
        "/home/ann/.local/share/krita/krita-sdxl-backend/venv/bin/python",  # Linux
    ],
)
def test_the_set_up_environment_starts_as_python_dash_m_on_every_platform(python: str) -> None:
    from krita_sdxl_refiner.adapters.backend import invocation

    program, args = invocation(python, "serve", "tcp://127.0.0.1:5588")
    assert program == python
    assert args == ["-m", "krita_sdxl.backend.cli", "serve", "--endpoint", "tcp://127.0.0.1:5588"]
