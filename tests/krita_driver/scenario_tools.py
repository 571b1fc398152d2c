"""Helpers shared by the scenarios that run inside real Krita (imported from the scenario's folder).

Runs in Krita's embedded Python with PyQt5 and the standard library only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from PyQt5.QtCore import Qt, QTimer  # type: ignore[import-not-found]
from PyQt5.QtTest import QTest  # type: ignore[import-not-found]

DOCKER_ID = "krita_sdxl_refiner"
DOCKER_TITLE = "SDXL Refiner"


def pattern(width: int, height: int) -> bytes:
    """Opaque BGRA8: B = x, G = y, R = (x * 3 + y * 5) % 256, A = 255."""
    rows = []
    for y in range(height):
        row = bytearray(width * 4)
        for x in range(width):
            row[x * 4 : x * 4 + 4] = bytes((x & 255, y & 255, (x * 3 + y * 5) & 255, 255))
        rows.append(bytes(row))
    return b"".join(rows)


class Ticker:
    """A precise QTimer; records the largest gap between ticks (how long Krita's UI thread was blocked)."""

    def __init__(self, interval_ms: int) -> None:
        self.timer = QTimer()
        self.timer.setTimerType(Qt.PreciseTimer)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.tick)
        self.gaps: list[tuple[float, float]] = []  # (end of the gap since start, gap)
        self.last = 0.0
        self.started = 0.0

    def start(self) -> None:
        self.started = self.last = time.perf_counter()
        self.timer.start()

    def tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append((now - self.started, now - self.last))
        self.last = now

    def stop(self) -> dict[str, Any]:
        self.tick()  # a stall right before stopping counts too
        self.timer.stop()
        ordered = sorted(g for _t, g in self.gaps)
        worst_at, worst = max(self.gaps, key=lambda tg: tg[1])
        return {
            "ticks": len(self.gaps),
            "max_gap_ms": round(worst * 1000, 1),
            "p99_gap_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 1),
            "worst_at_s": round(worst_at, 3),
            "over_100ms": sum(g > 0.1 for g in ordered),
            "top_gaps_ms": [[round(t, 3), round(g * 1000, 1)] for t, g in sorted(self.gaps, key=lambda tg: -tg[1])[:5]],
        }


class Probe:
    """Times chosen methods of live objects (instance attributes shadow the class's) on Krita's UI
    thread, to find what blocks it; ``records`` holds (label, start since ``t0``, seconds)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.records: list[tuple[str, float, float]] = []

    def wrap(self, obj: Any, name: str, label: str | None = None) -> None:
        original = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.records.append((label or name, start - self.t0, time.perf_counter() - start))

        setattr(obj, name, timed)

    def slow(self, at_least_s: float = 0.003) -> list[list[Any]]:
        return [[label, round(t, 3), round(d * 1000, 1)] for label, t, d in self.records if d >= at_least_s]


def find_docker(app: Any) -> Any:
    for docker in app.dockers():
        if docker.objectName() == DOCKER_ID or docker.windowTitle() == DOCKER_TITLE:
            return docker
    raise AssertionError(f"no {DOCKER_TITLE} docker; dockers: {sorted(d.windowTitle() for d in app.dockers())}")


def click(widget: Any) -> None:
    """A real mouse click on a widget of the docker (it must be visible and enabled to react)."""
    if not widget.isVisible():
        raise AssertionError(f"cannot click {widget.objectName() or widget}: not visible")
    if not widget.isEnabled():
        raise AssertionError(f"cannot click {getattr(widget, 'text', lambda: widget)()}: disabled")
    QTest.mouseClick(widget, Qt.LeftButton)


def type_into(widget: Any, text: str, enter: bool = False) -> None:
    """Select what the field holds and type ``text`` over it, key by key (Enter at the end if asked)."""
    widget.setFocus()
    widget.selectAll()
    QTest.keyClick(widget, Qt.Key_Delete)
    QTest.keyClicks(widget, text)
    if enter:
        QTest.keyClick(widget, Qt.Key_Return)


def until(ctx: Any, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``yield from until(...)``: poll from QTimers (Krita's event loop keeps running)."""
    return ctx.wait_for(predicate, timeout_s, what, poll_ms=20)
