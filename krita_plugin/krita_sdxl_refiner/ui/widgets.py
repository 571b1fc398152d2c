"""Small Qt widgets and text formatting for the docker (no Krita, no sockets)."""

from __future__ import annotations

import time
from typing import Any

from PyQt5.QtCore import QRect, QSize, Qt
from PyQt5.QtGui import QFontMetrics, QPainter, QPalette
from PyQt5.QtWidgets import QLabel, QPlainTextEdit, QSizePolicy, QToolButton, QVBoxLayout, QWidget

MESSAGES_KEPT = 200

STATE_COLORS = {
    "invalid": "#d04040",
    "connected": "#3fa34d",
    "connecting": "#d7a000",
    "disconnected": "#d04040",
    "running": "#3fa34d",
    "starting": "#d7a000",
    "stopping": "#d7a000",
    "stopped": "#888888",
    "failed": "#d04040",
}
LEVEL_COLORS = {"info": "", "warning": "#d7a000", "error": "#e05050"}


class Collapsible(QWidget):
    """A titled section whose content can be folded away."""

    def __init__(self, title: str, content: QWidget, expanded: bool = False, parent: QWidget | None = None):
        super().__init__(parent)
        self.button = QToolButton(self)
        self.button.setText(title)
        self.button.setCheckable(True)
        self.button.setChecked(expanded)
        self.button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.button.setAutoRaise(True)
        self.button.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.content = content
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.button)
        layout.addWidget(content)
        self.button.toggled.connect(lambda checked: self.set_expanded(checked))
        self.set_expanded(expanded)

    def set_expanded(self, expanded: bool) -> None:
        self.button.setChecked(expanded)
        self.button.setArrowType(Qt.DownArrow if expanded else Qt.RightArrow)
        self.content.setVisible(expanded)


class ElidedLabel(QLabel):
    """One line of plain text that ends in "…" when it does not fit; never widens its container.
    ``text()`` is the whole text (the tooltip too, unless one is set)."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._text = ""
        self.setTextFormat(Qt.PlainText)
        self.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.setText(text)

    def text(self) -> str:
        return self._text

    def setText(self, text: str) -> None:
        self._text = text
        self._elide()

    def resizeEvent(self, event: Any) -> None:
        super().resizeEvent(event)
        self._elide()

    def _elide(self) -> None:
        width = self.width() if self.isVisible() else 10_000
        super().setText(self.fontMetrics().elidedText(self._text, Qt.ElideRight, width))


class ProgressLine(QWidget):
    """A progress bar with a line of text that repaints with the next paint cycle (``update``).
    ``QProgressBar.setValue`` repaints at once (``repaint``): 23 ms of Krita's UI thread per step,
    measured in Krita 5.1 under Xvfb, and its busy animation repaints all the time."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._min, self._max, self._value, self._text = 0, 1, 0, ""
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)

    def setRange(self, lo: int, hi: int) -> None:
        if (lo, hi) != (self._min, self._max):
            self._min, self._max = lo, hi
            self.update()

    def setValue(self, value: int) -> None:
        if value != self._value:
            self._value = value
            self.update()

    def setFormat(self, text: str) -> None:
        if text != self._text:
            self._text = text
            self.update()

    def value(self) -> int:
        return self._value

    def maximum(self) -> int:
        return self._max

    def format(self) -> str:
        return self._text

    def sizeHint(self) -> QSize:
        return QSize(80, self.fontMetrics().height() + 8)

    def minimumSizeHint(self) -> QSize:
        return QSize(40, self.fontMetrics().height() + 8)

    def paintEvent(self, event: Any) -> None:
        painter = QPainter(self)
        palette = self.palette()
        rect = self.rect().adjusted(0, 0, -1, -1)
        painter.fillRect(rect, palette.color(QPalette.Base))
        span = self._max - self._min
        if span > 0:
            done = max(0.0, min(1.0, (self._value - self._min) / span))
            painter.fillRect(QRect(rect.x(), rect.y(), round(rect.width() * done), rect.height()),
                             palette.color(QPalette.Highlight))  # fmt: skip
        elif self._text:  # busy: no animation (it would repaint all the time), a dimmed bar
            color = palette.color(QPalette.Highlight)
            color.setAlpha(70)
            painter.fillRect(rect, color)
        painter.setPen(palette.color(QPalette.Mid))
        painter.drawRect(rect)
        painter.setPen(palette.color(QPalette.Text))
        painter.drawText(rect, Qt.AlignCenter, self.fontMetrics().elidedText(self._text, Qt.ElideRight, rect.width()))
        painter.end()


class MessageLog(QPlainTextEdit):
    """The docker's messages, newest last, each with its time: a new message never hides an older one."""

    def __init__(self, lines: int = 3, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setReadOnly(True)
        self.setMaximumBlockCount(MESSAGES_KEPT)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.setFrameShape(QPlainTextEdit.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAsNeeded)
        self.setPlaceholderText("Messages appear here.")
        line = QFontMetrics(self.font()).lineSpacing()
        self.setFixedHeight(line * lines + 2 * self.frameWidth() + 8)
        self.entries: list[tuple[str, str]] = []  # (level, text), for tests and tooltips

    def add(self, text: str, level: str = "info") -> None:
        self.entries = [*self.entries[-MESSAGES_KEPT + 1 :], (level, text)]
        stamp = time.strftime("%H:%M")
        self.appendHtml(f'<span style="color:#888888">{stamp}</span> {notice_html(text, level)}')
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())


def state_text(state: str, detail: str = "") -> str:
    """Rich text: a coloured dot, the state and its detail."""
    color = STATE_COLORS.get(state, "#888888")
    dot = f'<span style="color:{color}">●</span>'
    return f"{dot} {escape(state)}" + (f" — {escape(detail)}" if detail and detail != state else "")


def notice_html(text: str, level: str) -> str:
    color = LEVEL_COLORS.get(level, "")
    return f'<span style="color:{color}">{escape(text)}</span>' if color else escape(text)


def format_bytes(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        return "?"
    if value >= 2**30:
        return f"{value / 2**30:.1f} GiB"
    if value >= 2**20:
        return f"{value / 2**20:.0f} MiB"
    return f"{value:.0f} B"


def _model_names(models: Any) -> list[str]:
    names: list[str] = []
    if isinstance(models, list):
        for m in models:
            if isinstance(m, str):
                names.append(m)
            elif isinstance(m, dict):
                names.append(str(m.get("name") or m.get("id") or m.get("path") or "?"))
    return names


def describe_backend(server: str, caps: dict[str, Any]) -> str:
    """One or two lines about the backend from its ``welcome``: device, GPU memory, models."""
    parts: list[str] = []
    device = " ".join(str(caps[k]) for k in ("device", "dtype") if caps.get(k))
    gpu = caps.get("gpu") or caps.get("gpu_name")
    if gpu:
        device = f"{device} · {gpu}" if device else str(gpu)
    if device:
        parts.append(device)
    total, free = caps.get("gpu_memory_total"), caps.get("gpu_memory_free")
    if total:
        parts.append(f"{format_bytes(free)} free of {format_bytes(total)}")
    models = _model_names(caps.get("models"))
    first = " · ".join(parts)
    lines = [line for line in (server, first, ", ".join(models)) if line]
    return "\n".join(lines)


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def wrap_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextSelectableByMouse)
    return label
