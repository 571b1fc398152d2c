"""The workflow's pure-Python signals (krita_plugin/krita_sdxl_refiner/core/signals.py) behave as Qt's direct
connections where the plugin relies on it: every slot runs, in order; a slot that raises goes to
``sys.excepthook`` and the others still run; a slot whose Qt object was deleted is dropped, so closing one
window's docker never breaks the one controller all dockers share. And the workflow imports without Qt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PyQt5.QtWidgets")
pytest.importorskip("zmq")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))

from plugin_fakes import FakeAdapter, make_controller

from krita_sdxl_refiner.core.signals import BoundSignal, Signal

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "krita_plugin"


class Source:
    changed = Signal(str, int)
    done = Signal()


@pytest.fixture
def hook(monkeypatch) -> list[BaseException]:
    """What reaches sys.excepthook (instead of the test runner's)."""
    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, exc, tb: seen.append(exc))
    return seen


def test_each_instance_has_its_own_signal_and_slots_run_in_order():
    a, b = Source(), Source()
    assert isinstance(a.changed, BoundSignal) and a.changed is a.changed and a.changed is not b.changed
    assert isinstance(Source.changed, Signal)
    calls: list[tuple[str, str, int]] = []
    a.changed.connect(lambda text, n: calls.append(("first", text, n)))
    a.changed.connect(lambda text, n: calls.append(("second", text, n)))
    a.changed.emit("x", 1)
    b.changed.emit("y", 2)  # nobody listens to b
    assert calls == [("first", "x", 1), ("second", "x", 1)]


def test_disconnect_one_slot_or_all_and_an_unknown_slot_raises_as_in_pyqt():
    s = Source()
    calls: list[str] = []

    class Listener:
        def on_done(self) -> None:
            calls.append("method")

    listener = Listener()
    s.done.connect(listener.on_done)
    s.done.connect(lambda: calls.append("lambda"))
    s.done.disconnect(listener.on_done)  # a new bound method object, equal to the connected one
    s.done.emit()
    assert calls == ["lambda"]
    with pytest.raises(TypeError):
        s.done.disconnect(listener.on_done)
    s.done.disconnect()
    s.done.emit()
    assert calls == ["lambda"] and s.done.receivers() == 0
    with pytest.raises(TypeError):
        s.done.connect("not callable")  # type: ignore[arg-type]


def test_a_failing_slot_goes_to_excepthook_and_the_others_still_run(hook):
    s = Source()
    calls: list[str] = []

    def broken(text: str, n: int) -> None:
        raise ValueError("slot bug")

    s.changed.connect(broken)
    s.changed.connect(lambda text, n: calls.append(text))
    s.changed.emit("still delivered", 0)
    s.changed.emit("again", 0)
    assert calls == ["still delivered", "again"]
    assert [str(e) for e in hook] == ["slot bug", "slot bug"]  # a plain bug stays connected, and is seen


def test_a_slot_of_a_deleted_qt_object_is_dropped_silently(app, hook):
    from PyQt5 import sip
    from PyQt5.QtWidgets import QLabel

    s = Source()
    label, other = QLabel(), QLabel()
    s.changed.connect(lambda text, n: label.setText(text))
    s.changed.connect(lambda text, n: other.setText(text))
    s.changed.emit("one", 1)
    assert label.text() == "one" and s.changed.receivers() == 2
    sip.delete(label)  # as Qt deletes a closed window's widgets
    s.changed.emit("two", 2)
    assert other.text() == "two" and s.changed.receivers() == 1 and not hook


def test_other_runtime_errors_are_reported_not_dropped(hook):
    s = Source()

    def busy() -> None:
        raise RuntimeError("something else")

    s.done.connect(busy)
    s.done.emit()
    s.done.emit()
    assert s.done.receivers() == 1 and len(hook) == 2


def test_a_signal_is_a_slot_for_qt_and_pure_signals(app):
    from PyQt5.QtCore import QObject, pyqtSignal

    class QtSource(QObject):
        state_changed = pyqtSignal(str, int)

    qt, relay, target = QtSource(), Source(), Source()
    got: list[tuple[str, int]] = []
    qt.state_changed.connect(relay.changed)  # Qt -> pure
    relay.changed.connect(target.changed)  # pure -> pure
    target.changed.connect(lambda text, n: got.append((text, n)))
    qt.state_changed.emit("connected", 3)
    relay.changed("called", 4)  # calling a signal emits it
    assert got == [("connected", 3), ("called", 4)]


def test_closing_one_docker_leaves_the_shared_controller_working(app, ctx, hook):
    """Two windows' dockers on the one controller; one window closes (its widgets are deleted): the
    controller's next events reach the other docker, and nothing is reported as an error."""
    from PyQt5 import sip

    from krita_sdxl_refiner.ui.panel import RefinerPanel

    adapter = FakeAdapter()
    controller = make_controller(ctx, "tcp://127.0.0.1:9", adapter)  # nothing listens there
    closed, kept = RefinerPanel(controller), RefinerPanel(controller)
    try:
        listeners = controller.notice.receivers()
        sip.delete(closed)
        controller.notice.emit("after the window closed", "info")
        controller.update_settings(prompt="a green barn")  # settings_changed
        job = controller.refine()  # jobs_changed: the job waits for the backend
        assert job is not None
        assert "after the window closed" in [text for _level, text in kept.messages.entries]
        assert kept.prompt.toPlainText() == "a green barn" and kept.history.job_rows.keys() == {job.id}
        assert controller.notice.receivers() < listeners and not hook
    finally:
        controller.shutdown()
        kept.deleteLater()


def test_the_workflow_and_core_import_without_qt_krita_or_zmq():
    code = (
        "import sys\n"
        "for name in ('PyQt5', 'krita', 'zmq'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "import krita_sdxl_refiner.workflow.controller, krita_sdxl_refiner.workflow.setup_runner\n"
        "import krita_sdxl_refiner.core.document, krita_sdxl_refiner.core.host, krita_sdxl_refiner.vendor\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
