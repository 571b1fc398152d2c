"""The docker's Live row: the Live toggle, Apply, New seed and the latency; under it, while Live is on, its
three settings (UNet calls, work size, wait). Pure PyQt5; what the buttons do is ``workflow.live``."""

from __future__ import annotations

from typing import Any

from PyQt5.QtWidgets import QHBoxLayout, QPushButton, QSpinBox, QToolButton, QVBoxLayout, QWidget

from ..core.settings import Settings
from .settings_view import SettingsView
from .slots import on_click
from .widgets import ElidedLabel

APPLY_SHORTCUT = "Ctrl+Shift+Return"  # the Krita action "Apply live preview (SDXL)" (plugin.py); settable in Krita

TIPS = {
    "live": "Live: while on, every change to the source (strokes, the selection, the prompt, the strength) "
    "starts a quick refine once the canvas is still; the newest result replaces the last one in the "
    "“Live preview” layer above the source. Off removes that layer.",
    "apply": f"Copy the live preview into a normal result layer and the results ({APPLY_SHORTCUT})",
    "seed": "A new seed for the live preview (the seed stays fixed while you paint)",
    "latency": "From the end of the last change (your stroke) to the preview shown",
    "calls": "Live: at most this many UNet calls a job (the steps are capped, the strength kept); fewer is faster",
    "side": "Live: the work size's long side at most (px); a smaller selection runs at its own size",
    "wait": "Live: a job starts once the canvas has been still this long (ms)",
}


def _spin(lo: int, hi: int, step: int, suffix: str, tip: str) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(lo, hi)
    spin.setSingleStep(step)
    spin.setSuffix(suffix)
    spin.setToolTip(tip)
    spin.setKeyboardTracking(False)  # one job per edit, not per digit typed
    return spin


class LiveBar(SettingsView):
    def __init__(self, controller: Any, parent: QWidget | None = None) -> None:
        super().__init__(controller, parent)
        self.live = controller.live
        root = QVBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        root.setSpacing(2)
        row = QHBoxLayout()
        self.toggle = QPushButton("Live")
        self.toggle.setCheckable(True)
        self.toggle.setToolTip(TIPS["live"])
        self.apply_button = QPushButton("Apply")
        self.apply_button.setToolTip(TIPS["apply"])
        self.seed_button = QToolButton()
        self.seed_button.setText("↻ Seed")
        self.seed_button.setToolTip(TIPS["seed"])
        row.addWidget(self.toggle, 1)
        row.addWidget(self.apply_button, 1)
        row.addWidget(self.seed_button)
        root.addLayout(row)
        self.options = QWidget()  # shown while Live is on: its settings, then what it is doing
        box = QVBoxLayout(self.options)
        box.setContentsMargins(0, 0, 0, 0)
        box.setSpacing(2)
        opts = QHBoxLayout()
        self.calls = _spin(1, 20, 1, " calls", TIPS["calls"])
        self.side = _spin(256, 2048, 64, " px", TIPS["side"])
        self.wait = _spin(0, 5000, 50, " ms", TIPS["wait"])
        for widget in (self.calls, self.side, self.wait):
            opts.addWidget(widget)
        box.addLayout(opts)
        self.status = ElidedLabel()
        self.status.setToolTip(TIPS["latency"])
        box.addWidget(self.status)
        root.addWidget(self.options)

        on_click(self.toggle.clicked, lambda: self.live.set_on(self.toggle.isChecked()))
        on_click(self.apply_button.clicked, self.live.apply)
        on_click(self.seed_button.clicked, self.live.new_seed)
        self.calls.valueChanged.connect(lambda v: self._set(live_calls=v))
        self.side.valueChanged.connect(lambda v: self._set(live_side=v))
        self.wait.valueChanged.connect(lambda v: self._set(live_wait_ms=v))
        self.live.changed.connect(self.update_state)
        controller.settings_changed.connect(self.show_settings)
        self.show_settings(controller.settings)
        self.update_state()

    def show_settings(self, s: Settings) -> None:
        with self.showing():
            self.calls.setValue(s.live_calls)
            self.side.setValue(s.live_side)
            self.wait.setValue(s.live_wait_ms)

    def update_state(self) -> None:
        live = self.live
        self.toggle.setChecked(live.on)
        self.toggle.setText("● Live" if live.on else "Live")
        font = self.toggle.font()
        font.setBold(live.on)
        self.toggle.setFont(font)
        self.apply_button.setEnabled(live.can_apply)
        self.seed_button.setEnabled(live.on)
        self.options.setVisible(live.on)
        seed = f" · seed {live.seed}" if live.on and live.seed is not None else ""
        self.status.setText(live.status + seed if live.on else "")
