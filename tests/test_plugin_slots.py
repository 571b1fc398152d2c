"""The one rule for slots (krita_plugin/krita_sdxl_refiner/ui/slots.py): every ``clicked`` and
``triggered`` signal in the plugin goes through ``on_click``, which drops the ``checked`` argument.
A direct ``button.clicked.connect(controller.refine)`` is how the docker's Refine button broke."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PyQt5.QtWidgets")

PLUGIN = Path(__file__).resolve().parents[1] / "krita_plugin" / "krita_sdxl_refiner"
sys.path.insert(0, str(PLUGIN.parent))

ARGUMENT_SIGNALS = {"clicked", "triggered", "toggled", "pressed", "released"}  # carry ``checked``


def direct_connections(source: str) -> list[tuple[int, str]]:
    """``X.clicked.connect(...)`` / ``X.triggered.connect(...)`` calls, and ``connect`` of a signal
    with a ``checked`` argument to something other than a lambda (which names what it receives)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"):
            continue
        signal = node.func.value
        if not isinstance(signal, ast.Attribute) or signal.attr not in ARGUMENT_SIGNALS:
            continue
        if signal.attr in ("clicked", "triggered"):
            found.append((node.lineno, f"{signal.attr}.connect"))
        elif node.args and not isinstance(node.args[0], ast.Lambda):
            found.append((node.lineno, f"{signal.attr}.connect to a non-lambda"))
    return found


def test_no_button_or_action_is_connected_directly():
    offenders = []
    for path in sorted(PLUGIN.rglob("*.py")):
        if "_vendor" in path.parts or path.name == "slots.py":
            continue
        offenders += [f"{path.name}:{line}: {what}" for line, what in direct_connections(path.read_text())]
    assert not offenders, "connect buttons and actions with slots.on_click:\n" + "\n".join(offenders)


def test_the_checker_finds_the_old_wiring():
    old = "self.refine_button.clicked.connect(c.refine)\nwindow.action.triggered.connect(self._refine)\n"
    old += "self.random_seed.toggled.connect(self._on_seed_edit)\nself.box.toggled.connect(lambda v: f(v))\n"
    assert [line for line, _ in direct_connections(old)] == [1, 2, 3]


def test_on_click_drops_the_checked_argument_of_a_guarded_method():
    from PyQt5.QtCore import QObject, pyqtSignal
    from PyQt5.QtWidgets import QApplication, QPushButton

    from krita_sdxl_refiner.core.guard import guarded
    from krita_sdxl_refiner.ui.slots import on_click

    app = QApplication.instance() or QApplication([])  # noqa: F841  (kept alive for the test)

    class Target(QObject):
        notice = pyqtSignal(str, str)

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0
            self.notices: list[str] = []
            self.notice.connect(lambda text, level: self.notices.append(text))

        @guarded
        def run(self) -> None:
            self.calls += 1

    target = Target()
    broken, fixed = QPushButton(), QPushButton()
    broken.clicked.connect(target.run)  # the old wiring: run(False) inside the guard
    on_click(fixed.clicked, target.run)
    broken.click()
    assert target.calls == 0 and "TypeError" in target.notices[0]
    fixed.click()
    assert target.calls == 1 and len(target.notices) == 1
