"""The docker's content in a vertical scroll area, so the docker fits whatever height Krita gives it."""

from __future__ import annotations

from PyQt5.QtCore import QEvent, QObject, QSize, Qt
from PyQt5.QtWidgets import QFrame, QScrollArea, QWidget

MIN_HEIGHT = 120  # px: the prompt and the Run button; Krita's own dockers go as low (Layers: 184, Brush Presets: 118)


class VerticalScroll(QScrollArea):
    """Scrolls its content up and down, never sideways: the content is as wide as the docker, whose
    minimum width follows the content's (plus the scroll bar). Its minimum height is ``MIN_HEIGHT``,
    whatever the content needs (that scrolls)."""

    def __init__(self, content: QWidget, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAsNeeded)
        self.setWidget(content)
        content.installEventFilter(self)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.widget() and event.type() == QEvent.LayoutRequest:
            self.updateGeometry()  # Advanced unfolded may need more width: the docker's minimum follows
        return super().eventFilter(watched, event)

    def minimumSizeHint(self) -> QSize:
        bar = self.verticalScrollBar().sizeHint().width()  # room for the bar: the content is never cut sideways
        return QSize(self.widget().minimumSizeHint().width() + bar, MIN_HEIGHT)

    def sizeHint(self) -> QSize:
        return self.widget().sizeHint()
