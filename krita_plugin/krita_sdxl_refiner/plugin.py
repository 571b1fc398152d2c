"""Registration with Krita: the Refine action and the "SDXL Refiner" docker, and the one controller they share.

Only this module, ``adapters.krita_adapter`` and ``adapters.krita_live`` import ``krita``. The controller is wired
in :mod:`compose` (the composition root: Krita's document adapter, the ZeroMQ client, the local backend, Qt's
timers, live refine on Krita's live port). The
vendored dependencies are activated before anything imports zmq or msgpack; when none fits the running
Python, the docker shows why.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

from krita import DockWidget, DockWidgetFactory, DockWidgetFactoryBase, Extension, Krita  # type: ignore

ACTION_ID = "krita_sdxl_refine"
ACTION_TEXT = "Refine (SDXL)"
LIVE_APPLY_ID = "krita_sdxl_live_apply"
LIVE_APPLY_TEXT = "Apply live preview (SDXL)"
DOCKER_ID = "krita_sdxl_refiner"
DOCKER_TITLE = "SDXL Refiner"

_problem: str | None = None
_controller: Any = None


def _activate_dependencies() -> str | None:
    """None when zmq, msgpack and the protocol import; else a message for the artist."""
    try:
        from . import vendor
    except ImportError:
        vendor = None  # a development install: the dependencies come from Krita's Python
    if vendor is not None:
        try:
            vendor.activate()
        except vendor.VendorError as exc:
            return str(exc)
        except Exception as exc:
            return f"The SDXL Refiner could not load its libraries: {type(exc).__name__}: {exc}"
    try:
        import msgpack  # noqa: F401
        import zmq  # noqa: F401

        import krita_sdxl.protocol  # noqa: F401
    except ImportError as exc:
        return (
            f"The SDXL Refiner cannot run: {exc} (Python {platform.python_version()} on "
            f"{sys.platform}/{platform.machine()}). Reinstall the plugin from its zip."
        )
    return None


def controller() -> Any:
    """The one controller shared by the action and every window's docker (created on first use)."""
    global _controller
    if _controller is None:
        from .adapters.krita_adapter import KritaAdapter
        from .adapters.krita_live import KritaLive
        from .compose import build_controller

        _controller = build_controller(KritaAdapter(), live=KritaLive())
        _controller.start()
        from PyQt5.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(_controller.shutdown)  # stop the client and a local backend
    return _controller


class RefinerExtension(Extension):
    def __init__(self, parent: Any) -> None:
        super().__init__(parent)

    def setup(self) -> None:
        if _problem is None:
            controller()  # connect now, with the settings from kritarc

    def createActions(self, window: Any) -> None:
        action = window.createAction(ACTION_ID, ACTION_TEXT, "tools/scripts")
        action.setToolTip("Refine the selection (or the active layer) with the SDXL refiner")
        from .ui.slots import on_click

        on_click(action.triggered, self._refine)
        from .ui.live import APPLY_SHORTCUT

        apply = window.createAction(LIVE_APPLY_ID, LIVE_APPLY_TEXT, "tools/scripts")
        apply.setToolTip("Copy the live preview into a normal result layer")
        if not apply.shortcut().toString():  # the artist's own choice (Settings > Keyboard Shortcuts) wins
            from PyQt5.QtGui import QKeySequence

            apply.setShortcut(QKeySequence(APPLY_SHORTCUT))
        on_click(apply.triggered, self._apply_live)

    def _apply_live(self) -> None:
        if _problem is None and controller().live is not None:
            controller().live.apply()

    def _refine(self) -> None:
        if _problem is not None:
            print(f"[krita_sdxl_refiner] {_problem}", file=sys.stderr)
            return
        controller().refine()


class RefinerDocker(DockWidget):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle(DOCKER_TITLE)
        self.panel: Any = None
        if _problem is not None:
            from .ui.panel import MessagePanel

            self.setWidget(MessagePanel(_problem))
        else:
            from .ui.panel import RefinerPanel

            self.panel = RefinerPanel(controller())
            # Krita 5.1: the docker's canvas().view() can lag behind a view switch; activeDocument() does not.
            self.panel.history.document_of_view = lambda: Krita.instance().activeDocument()
            self.setWidget(self.panel)

    def canvasChanged(self, canvas: Any) -> None:
        if self.panel is not None:
            from PyQt5.QtCore import QTimer

            QTimer.singleShot(0, self.panel.document_changed)  # once Krita has made the view active


def register() -> None:
    global _problem
    _problem = _activate_dependencies()
    app = Krita.instance()
    app.addExtension(RefinerExtension(app))
    app.addDockWidgetFactory(DockWidgetFactory(DOCKER_ID, DockWidgetFactoryBase.DockRight, RefinerDocker))
