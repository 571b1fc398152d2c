"""The rule every docker part that edits settings follows: a widget's change goes to the controller,
except while the part shows the settings it was given (showing them must not write them back)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PyQt5.QtWidgets import QWidget

from ..workflow.controller import Controller


class SettingsView(QWidget):
    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self._showing = False

    def _set(self, **changes: Any) -> None:
        """A widget changed: the settings change (not while ``showing``)."""
        if not self._showing:
            self.controller.update_settings(**changes)

    @contextmanager
    def showing(self) -> Iterator[None]:
        """While the widgets are set from settings: their change signals change nothing."""
        self._showing = True
        try:
            yield
        finally:
            self._showing = False
