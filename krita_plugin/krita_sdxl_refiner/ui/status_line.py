"""The docker's connection line: a coloured dot, the state and its detail on one line, cut with "…"
where it does not fit (never mid-word without a sign); the whole text is in the tooltip."""

from __future__ import annotations

from typing import Any

from PyQt5.QtCore import Qt
from PyQt5.QtWidgets import QLabel, QSizePolicy, QWidget

from .widgets import STATE_COLORS, escape

DOT = "●"


class StatusLine(QLabel):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setTextFormat(Qt.RichText)
        self.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)  # never widens the docker
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self._state, self._plain = "", ""
        self.shown = ""  # the text as shown, after the dot ("disconnected — no ans…")

    def show_state(self, state: str, detail: str, tooltip: str = "") -> None:
        """``state — detail`` on the line; ``tooltip`` (default: the same, whole) when hovered."""
        self._state = state
        self._plain = state + (f" — {detail}" if detail and detail != state else "")
        self.setToolTip(tooltip or self._plain)
        self._render()

    @property
    def full_text(self) -> str:
        return self._plain

    def resizeEvent(self, event: Any) -> None:
        super().resizeEvent(event)
        self._render()

    def _render(self) -> None:
        metrics = self.fontMetrics()
        room = self.contentsRect().width() - metrics.horizontalAdvance(DOT + "  ")
        self.shown = metrics.elidedText(self._plain, Qt.ElideRight, max(0, room)) if self.isVisible() else self._plain
        color = STATE_COLORS.get(self._state, "#888888")
        self.setText(f'<span style="color:{color}">{DOT}</span> {escape(self.shown)}')
