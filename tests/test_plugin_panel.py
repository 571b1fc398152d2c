"""The docker's panel (offscreen Qt, no Krita) and the local backend process."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PyQt5.QtWidgets")
pytest.importorskip("zmq")

from PyQt5.QtCore import QEventLoop, Qt
from PyQt5.QtGui import QImage
from PyQt5.QtWidgets import QApplication

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))

from krita_sdxl.protocol.geometry import Box
from krita_sdxl_refiner.backend import Backend
from krita_sdxl_refiner.controller import Controller
from krita_sdxl_refiner.jobs import StoredResult
from krita_sdxl_refiner.panel import MessagePanel, RefinerPanel
from krita_sdxl_refiner.pixelformat import pixel_format


@pytest.fixture(scope="module")
def app():
    return QApplication.instance() or QApplication([])


class Store:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = dict(values)
        self.written: dict[str, str] = {}

    def read_setting(self, key: str, default: str) -> str:
        return self.values.get(key, default)

    def write_setting(self, key: str, value: str) -> None:
        self.written[key] = value


def wait(app, until, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        app.processEvents(QEventLoop.AllEvents, 20)
        time.sleep(0.005)


@pytest.fixture
def panel(app):
    store = Store({"prompt": "a lighthouse", "strength": "0.4", "steps": "25", "seed": "77", "source": "canvas"})
    controller = Controller(store)  # not started: no connection attempts
    widget = RefinerPanel(controller)
    yield widget, controller, store
    widget.deleteLater()
    controller.shutdown()


def test_panel_shows_the_stored_settings(panel):
    widget, _, _ = panel
    assert widget.prompt.toPlainText() == "a lighthouse"
    assert widget.strength.value() == 40 and widget.strength_value.text() == "0.40"
    assert widget.steps.value() == 25
    assert not widget.random_seed.isChecked() and widget.seed.text() == "77"
    assert widget.source.currentData() == "canvas"
    assert widget.mode.currentData() == "refine"
    assert widget.progress.format() == "step %v/%m"


def test_edits_are_persisted(panel):
    widget, controller, store = panel
    widget.prompt.setPlainText("a lighthouse at night")
    widget.strength.setValue(65)
    widget.random_seed.setChecked(True)
    widget.source.setCurrentIndex(widget.source.findData("layer"))
    assert store.written["prompt"] == "a lighthouse at night"
    assert store.written["strength"] == "0.65" and store.written["seed"] == "-1"
    assert store.written["source"] == "layer"
    assert controller.settings.prompt == "a lighthouse at night"


def test_modes_follow_the_backend_capabilities(panel):
    widget, controller, _ = panel
    controller.client.capabilities = {"modes": ["refine"], "device": "cuda", "gpu_name": "H100"}
    widget._on_capabilities("krita-sdxl", controller.client.capabilities)
    model = widget.mode.model()
    enabled = {widget.mode.itemData(r): model.item(r).isEnabled() for r in range(widget.mode.count())}
    assert enabled == {"refine": True, "generate": False, "two_stage": False}
    assert "H100" in widget.backend_info.text()


def test_results_list_and_preview(panel, app):
    widget, controller, _ = panel
    assert not widget.results_box.isVisibleTo(widget)
    item = StoredResult("j1", "Refine · seed 3", Box(0, 0, 8, 8), pixel_format("RGBA", "U8"), b"", "closed", 3)
    controller.results.add(item)
    controller.results_changed.emit()
    assert widget.results.count() == 1 and widget.results.item(0).data(Qt.UserRole) == "j1"
    assert widget.results_box.isVisibleTo(widget)
    controller.discard_result("j1")
    assert widget.results.count() == 0

    controller.update_settings(preview=True)
    image = QImage(16, 8, QImage.Format_RGBA8888)
    image.fill(Qt.red)
    controller.preview_ready.emit(image)
    assert widget.preview.pixmap() is not None and widget.preview.isVisibleTo(widget)


def test_connection_state_text(panel):
    widget, controller, _ = panel
    controller.connection_changed.emit("disconnected", "no reply from tcp://x for 5 s; retrying")
    assert "disconnected" in widget.connection.text() and "retrying" in widget.connection.text()


def test_message_panel(app):
    from PyQt5.QtWidgets import QLabel

    widget = MessagePanel("no pyzmq for Python 3.13")
    texts = [label.text() for label in widget.findChildren(QLabel)]
    assert texts == ["no pyzmq for Python 3.13"]


# --- local backend process -----------------------------------------------------------------------

posix_only = pytest.mark.skipif(os.name != "posix", reason="uses a shell script as the backend command")


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-krita-sdxl"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@posix_only
def test_backend_runs_until_stopped(app, tmp_path):
    backend = Backend()
    cmd = script(tmp_path, 'echo "loading"\necho "ready on $3"\nexec sleep 30\n')
    backend.start(cmd, "serve", "tcp://127.0.0.1:5588")
    wait(app, lambda: backend.state.value == "running")
    assert "ready on tcp://127.0.0.1:5588" in backend.log_tail()
    backend.stop()
    wait(app, lambda: backend.state.value == "stopped")


@posix_only
def test_backend_failure_keeps_the_log(app, tmp_path):
    backend = Backend()
    cmd = script(tmp_path, 'echo "Traceback: no CUDA device"\nexit 3\n')
    backend.start(cmd, "serve --demo", "tcp://127.0.0.1:5588")
    wait(app, lambda: backend.state.value == "failed")
    assert "code 3" in backend.detail and "no CUDA device" in backend.log_tail()


def test_backend_missing_command(app, tmp_path):
    backend = Backend()
    backend.start(str(tmp_path / "does-not-exist"), "serve", "tcp://127.0.0.1:5588")
    wait(app, lambda: backend.state.value == "failed")
    assert "could not start" in backend.detail
