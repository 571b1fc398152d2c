"""Test driver plugin for real Krita: run one scenario, write a JSON result, quit Krita.

``tests/krita_harness.py`` installs this file as ``pykrita/krita_sdxl_e2e_driver/__init__.py`` and
points ``$KRITA_SDXL_E2E_CONFIG`` at a JSON file::

    {"scenario": "/abs/scenario_x.py", "result": "/abs/result.json", "params": {...},
     "artifacts": "/abs/dir", "name": "run-name", "timeout_s": 90, "start_delay_ms": 300}

A scenario module defines ``run(ctx)`` returning a JSON-able dict, or a generator that yields
delays in milliseconds (the driver resumes it from a QTimer, so Krita's event loop keeps running:
never sleep on the UI thread) and finally returns the dict.

Every exception is caught and written to the result: an uncaught one would open Krita's modal
error dialog and Krita would never quit. ``sys.excepthook`` is replaced for the same reason, and
what reaches it (from any plugin's Qt slot) is reported as ``uncaught``. Before quitting, every
document is marked unmodified so that no save dialog opens.

Runs inside Krita's embedded Python (3.10 or newer), with PyQt5 and the standard library only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from krita import Extension, Krita, Selection  # type: ignore[import-not-found]
from PyQt5.QtCore import QTimer  # type: ignore[import-not-found]
from PyQt5.QtGui import QGuiApplication, QImage  # type: ignore[import-not-found]

CONFIG_ENV = "KRITA_SDXL_E2E_CONFIG"
T0 = time.monotonic()


def _log(message: str) -> None:
    print(f"[e2e-driver {time.monotonic() - T0:7.2f}s] {message}", file=sys.stderr, flush=True)


class Context:
    """What a scenario gets: Krita, its parameters, and helpers."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.app = Krita.instance()
        self.params: dict[str, Any] = config.get("params") or {}
        self.name: str = config.get("name", "krita")
        self.artifacts = Path(config["artifacts"]) if config.get("artifacts") else None
        self.messages: list[str] = []
        self.files: list[str] = []

    # -- reporting
    def log(self, message: str) -> None:
        self.messages.append(f"{time.monotonic() - T0:.2f}s {message}")
        _log(message)

    def artifact_path(self, label: str, suffix: str = ".png") -> Path | None:
        if self.artifacts is None:
            return None
        self.artifacts.mkdir(parents=True, exist_ok=True)
        return self.artifacts / f"{self.name}-{label}{suffix}"

    def screenshot(self, label: str) -> str | None:
        """The whole X screen, with ImageMagick's ``import``; blocks the UI for about half a second."""
        path = self.artifact_path(label)
        if path is None:
            return None
        try:
            subprocess.run(["import", "-window", "root", str(path)], check=True, timeout=20, capture_output=True)
        except (OSError, subprocess.SubprocessError) as exc:
            self.log(f"screenshot {label} failed: {exc!r}")
            return None
        self.files.append(str(path))
        return str(path)

    def save_bgra_png(self, label: str, data: bytes, width: int, height: int) -> str | None:
        """Save BGRA8 bytes (a layer's ``pixelData``) as a PNG with alpha."""
        path = self.artifact_path(label)
        if path is None:
            return None
        image = QImage(data, width, height, width * 4, QImage.Format_ARGB32).copy()
        if not image.save(str(path), "PNG"):
            self.log(f"could not save {path}")
            return None
        self.files.append(str(path))
        return str(path)

    # -- documents
    def new_document(
        self, width: int, height: int, name: str = "e2e", color_model: str = "RGBA", depth: str = "U8"
    ) -> Any:
        """A new document shown in the active window, so it is ``activeDocument()``."""
        doc = self.app.createDocument(width, height, name, color_model, depth, "", 72.0)
        if doc is None:
            raise RuntimeError(f"createDocument({width}, {height}, {color_model}, {depth}) returned None")
        window = self.app.activeWindow()
        if window is None:
            raise RuntimeError("Krita has no active window")
        window.addView(doc)
        self.app.setActiveDocument(doc)
        return doc

    @staticmethod
    def add_paint_layer(doc: Any, name: str, data: bytes | None = None, above: Any = None) -> Any:
        """A paint layer on top of the root (or above ``above``), filled with BGRA ``data``."""
        layer = doc.createNode(name, "paintlayer")
        doc.rootNode().addChildNode(layer, above)
        if data is not None:
            layer.setPixelData(data, 0, 0, doc.width(), doc.height())
        return layer

    @staticmethod
    def select_rect(doc: Any, x: int, y: int, w: int, h: int) -> Any:
        selection = Selection()
        selection.select(x, y, w, h, 255)
        doc.setSelection(selection)
        return selection

    @staticmethod
    def all_nodes(doc: Any) -> list[Any]:
        found: list[Any] = []

        def walk(node: Any) -> None:
            for child in node.childNodes():
                found.append(child)
                walk(child)

        walk(doc.rootNode())
        return found

    @staticmethod
    def node_id(node: Any) -> str:
        return node.uniqueId().toString()

    def wait_for(
        self, predicate: Callable[[], Any], timeout_s: float, what: str, poll_ms: int = 50
    ) -> Generator[int, None, float]:
        """``elapsed = yield from ctx.wait_for(...)``: poll without blocking Krita's event loop."""
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"waited {timeout_s:g} s for {what}")
            yield poll_ms
        return time.monotonic() - start


class DriverExtension(Extension):
    def __init__(self, parent: Any) -> None:
        super().__init__(parent)
        self.config: dict[str, Any] = {}
        self.ctx: Context | None = None
        self.generator: Generator[int, None, Any] | None = None
        self.started = False
        self.finished = False
        self.uncaught: list[str] = []
        self.timers: list[QTimer] = []
        self.t_window = None
        self.t_start = None

    # -- Krita's Extension interface
    def setup(self) -> None:
        sys.excepthook = self.excepthook
        path = os.environ.get(CONFIG_ENV)
        if not path:
            _log(f"${CONFIG_ENV} not set: the driver does nothing")
            return
        try:
            self.config = json.loads(Path(path).read_text(encoding="utf-8"))
        except Exception:
            _log("cannot read the config:\n" + traceback.format_exc())
            return
        Krita.instance().notifier().windowCreated.connect(self.on_window_created)
        _log(f"ready for scenario {self.config.get('scenario')}")

    def createActions(self, window: Any) -> None:
        pass

    # -- flow
    def excepthook(self, exc_type: type, exc: BaseException, tb: types.TracebackType | None) -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        self.uncaught.append(text)
        _log("uncaught exception:\n" + text)

    def later(self, ms: int, fn: Callable[[], None]) -> None:
        timer = QTimer()
        timer.setSingleShot(True)
        timer.timeout.connect(fn)
        timer.start(max(0, int(ms)))
        self.timers = [t for t in self.timers if t.isActive()] + [timer]

    def on_window_created(self) -> None:
        if self.started:
            return
        self.started = True
        self.t_window = time.monotonic() - T0
        _log("window created")
        with contextlib.suppress(Exception):  # fill the screen (no window manager to maximize it)
            Krita.instance().activeWindow().qwindow().setGeometry(QGuiApplication.primaryScreen().availableGeometry())
        self.later(int(self.config.get("timeout_s", 90) * 1000), self.on_watchdog)
        self.later(int(self.config.get("start_delay_ms", 300)), self.start)

    def start(self) -> None:
        self.t_start = time.monotonic() - T0
        try:
            spec = importlib.util.spec_from_file_location("krita_e2e_scenario", self.config["scenario"])
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load scenario {self.config['scenario']}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self.ctx = Context(self.config)
            outcome = module.run(self.ctx)
        except BaseException as exc:
            self.finish(error=exc)
            return
        if isinstance(outcome, Generator):
            self.generator = outcome
            self.step()
        else:
            self.finish(value=outcome)

    def step(self) -> None:
        if self.finished or self.generator is None:
            return
        try:
            delay = next(self.generator)
        except StopIteration as stop:
            self.finish(value=stop.value)
            return
        except BaseException as exc:
            self.finish(error=exc)
            return
        self.later(int(delay or 0), self.step)

    def on_watchdog(self) -> None:
        if not self.finished:
            if self.generator is not None:
                with contextlib.suppress(BaseException):
                    self.generator.close()
            self.finish(error=TimeoutError(f"scenario still running after {self.config.get('timeout_s', 90)} s"))

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        app = Krita.instance()
        result: dict[str, Any] = {
            "ok": error is None,
            "value": value,
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "traceback": None
            if error is None
            else "".join(traceback.format_exception(type(error), error, error.__traceback__)),
            "uncaught": self.uncaught,
            "log": self.ctx.messages if self.ctx else [],
            "files": self.ctx.files if self.ctx else [],
            "krita_version": app.version(),
            "python_version": sys.version.split()[0],
            "window_created_s": self.t_window,
            "scenario_started_s": self.t_start,
            "finished_s": time.monotonic() - T0,
        }
        try:
            text = json.dumps(result, indent=2, default=repr)
        except Exception as exc:  # a scenario returned something JSON cannot hold
            result.update(ok=False, value=repr(value), error=f"result not JSON-able: {exc!r}")
            text = json.dumps(result, indent=2, default=repr)
        target = Path(self.config["result"])
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        _log(f"result written: ok={result['ok']} {result['error'] or ''}")
        self.later(0, self.quit)

    def quit(self) -> None:
        app = Krita.instance()
        try:
            for doc in app.documents():
                doc.setModified(False)
            for doc in app.documents():
                doc.setModified(False)
                doc.close()
        except Exception:
            _log("closing documents failed:\n" + traceback.format_exc())
        _log("quitting Krita")
        action = app.action("file_quit")
        if action is not None:
            action.trigger()
        else:
            app.quit()


Krita.instance().addExtension(DriverExtension(Krita.instance()))
