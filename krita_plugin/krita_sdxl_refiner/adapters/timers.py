"""Qt's timers for the workflow (``core.host.Timers``): callbacks on Krita's event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PyQt5.QtCore import QTimer


class QtTimers:
    def later(self, ms: int, fn: Callable[[], Any]) -> None:
        QTimer.singleShot(ms, fn)

    def repeat(self, ms: int, fn: Callable[[], Any]) -> QTimer:
        timer = QTimer()
        timer.setInterval(ms)
        timer.timeout.connect(fn)
        timer.start()
        return timer  # stop() stops it; the caller keeps it alive
