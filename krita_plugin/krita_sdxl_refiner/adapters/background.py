"""Work off Krita's UI thread (``core.host.Background``): a Python thread, its answer delivered on the UI thread.

Krita's ``pixelData`` calls release Python's lock while they copy, and the plugin's own work on big
buffers goes in small steps, so the UI thread keeps running while a 6000x4000 layer is read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from PyQt5.QtCore import QObject, pyqtSignal


class _Answer(QObject):
    """Lives on the UI thread: a signal emitted from the worker is queued to it."""

    arrived = pyqtSignal(object, object)  # done, result


class QtBackground:
    def __init__(self) -> None:
        self._answer = _Answer()
        self._answer.arrived.connect(lambda done, result: done(result))

    def run(self, work: Callable[[], Any], done: Callable[[Any], Any]) -> None:
        def worker() -> None:
            try:
                result = work()
            except Exception as exc:  # handed to ``done``, on the UI thread
                result = exc
            self._answer.arrived.emit(done, result)

        threading.Thread(target=worker, name="krita-sdxl-capture", daemon=True).start()
