"""The docker's content, top-down in the order an artist works: prompt, strength, mode / source /
Run and the job's progress; the folded Advanced settings; then what happened (messages, queue and
results); one connection line at the bottom. The connection settings live in a dialog (the ⚙ button).
The content scrolls (:mod:`scroll`), so the docker fits whatever height Krita gives it.

Pure PyQt5 (runs offscreen in tests). Edits go straight to the controller, which persists them.
Buttons are connected with :func:`slots.on_click` only.
"""

from __future__ import annotations

import shutil
from typing import Any

from PyQt5.QtCore import Qt
from PyQt5.QtGui import QFontMetrics, QImage
from PyQt5.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSlider,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..core.jobs import JobState
from ..core.plan import MODE_LABELS
from ..core.settings import Settings
from ..workflow.controller import Controller
from .advanced import AdvancedSettings
from .history_view import HistoryView
from .live import LiveBar
from .scroll import VerticalScroll
from .settings_dialog import SettingsDialog
from .settings_view import SettingsView
from .slots import on_click
from .status_line import StatusLine
from .upscale import UpscaleOptions, strength_range
from .widgets import Collapsible, MessageLog, ProgressLine, describe_backend, wrap_label

SOURCES = (("Layer", "layer"), ("Image", "canvas"))
PROMPT_LINES = 3
RUN = "Run"  # the button: the mode box beside it says what runs (it never repeats "Refine")
COMBO_CHARS = 5  # the mode and source boxes shrink to this many characters (then elide) in a narrow docker

TIPS = {
    "mode": "Refine: the SDXL refiner redraws details of your pixels, as much as Strength says.\n"
    "Generate: the SDXL base paints the selection (Strength 1 = from scratch, lower keeps more of your "
    "pixels) and the refiner finishes it.\nTwo-stage: the base paints a new picture, then the refiner "
    "refines it at Strength.\nGenerate and Two-stage need a backend with the base model.",
    "source": "Layer: the pixels of the active layer (after a refine, that is the new result layer; "
    "use Again in the results to rerun the original).\nImage: everything visible, all layers merged.\n"
    "With a selection, only the selection (plus some context around it) is sent.",
    "strength": "How much to change: 0.1 touches up details, 0.3 refines, 0.6 and more repaints. "
    "Generate mode: 1 paints from scratch.",
    "refine": "Run the mode chosen at the left on the selection (or the whole layer); the result comes back as "
    "a new layer above it (Ctrl+Enter in the prompt does the same)",
    "cancel": "Cancel every job in the queue",
    "resubmit": "Run again the jobs the backend lost when it went away or stopped, as they were",
    "settings": "Connection settings: endpoint, keys for a remote backend, the local backend",
}


class PromptEdit(QPlainTextEdit):
    """The prompt; Ctrl+Enter runs the job."""

    def __init__(self, on_submit: Any) -> None:
        super().__init__()
        self._on_submit = on_submit
        self.setPlaceholderText("Prompt: what the picture shows (optional for a refine)")
        self.setTabChangesFocus(True)
        line = QFontMetrics(self.font()).lineSpacing()
        self.setFixedHeight(line * PROMPT_LINES + 2 * self.frameWidth() + 10)

    def keyPressEvent(self, event: Any) -> None:
        if event.key() in (Qt.Key_Return, Qt.Key_Enter) and event.modifiers() & Qt.ControlModifier:
            self._on_submit()
            return
        super().keyPressEvent(event)


class RefinerPanel(SettingsView):
    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__(controller, parent)
        self._connection = ("disconnected", "")
        self._build()
        self._connect()
        self.show_settings(controller.settings)
        self._on_connection(controller.client.state.value, controller.client.detail)
        if controller.client.capabilities:
            self._on_capabilities(controller.client.server, controller.client.capabilities)
        self._on_backend(controller.backend.state.value, controller.backend.detail)
        self._on_jobs()
        self.history.update_results()

    # --- layout ------------------------------------------------------------------------------

    def _build(self) -> None:
        content = QWidget()
        self.scroll = VerticalScroll(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)
        root = QVBoxLayout(content)
        root.setContentsMargins(4, 4, 4, 4)
        root.setSpacing(4)

        self.prompt = PromptEdit(lambda: self.controller.refine())
        root.addWidget(self.prompt)

        row = QHBoxLayout()
        label = QLabel("Strength")
        label.setToolTip(TIPS["strength"])
        self.strength = QSlider(Qt.Horizontal)
        self.strength.setRange(1, 100)
        self.strength.setToolTip(TIPS["strength"])
        self.strength_value = QLabel()
        self.strength_value.setMinimumWidth(QFontMetrics(self.font()).horizontalAdvance("0.00") + 4)
        row.addWidget(label)
        row.addWidget(self.strength, 1)
        row.addWidget(self.strength_value)
        root.addLayout(row)

        row = QHBoxLayout()
        self.mode = QComboBox()
        for mode, text in MODE_LABELS.items():
            self.mode.addItem(text, mode)
        self.mode.setToolTip(TIPS["mode"])
        self.source = QComboBox()
        for text, value in SOURCES:
            self.source.addItem(text, value)
        self.source.setToolTip(TIPS["source"])
        for combo in (self.mode, self.source):
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(COMBO_CHARS)
        self.refine_button = QPushButton(RUN)
        self.refine_button.setToolTip(TIPS["refine"])
        self.refine_button.setDefault(True)
        self.refine_button.setMinimumHeight(self.refine_button.sizeHint().height() + 6)
        font = self.refine_button.font()
        font.setBold(True)
        self.refine_button.setFont(font)
        row.addWidget(self.mode)
        row.addWidget(self.source)
        row.addWidget(self.refine_button, 1)
        root.addLayout(row)

        row = QHBoxLayout()  # right under Run: in a short docker (a laptop) the job's progress still shows
        self.progress = ProgressLine()
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip(TIPS["cancel"])
        self.resubmit_button = QPushButton("Resubmit")
        self.resubmit_button.setToolTip(TIPS["resubmit"])
        self.resubmit_button.hide()
        row.addWidget(self.progress, 1)
        row.addWidget(self.cancel_button)
        row.addWidget(self.resubmit_button)
        root.addLayout(row)

        self.upscale = UpscaleOptions(self.controller)  # the Upscale mode's factor, place, method (ui/upscale.py)
        root.addWidget(self.upscale)

        if self.controller.live is not None:  # live refine (ui/live.py): in Krita, not without a live port
            self.live = LiveBar(self.controller)
            root.addWidget(self.live)

        self.advanced = AdvancedSettings(self.controller)
        self.advanced_section = Collapsible("Advanced", self.advanced)
        root.addWidget(self.advanced_section)

        self.messages = MessageLog(lines=3)
        root.addWidget(self.messages)

        self.history = HistoryView(self.controller)
        root.addWidget(self.history, 1)

        row = QHBoxLayout()
        self.connection = StatusLine()
        self.backend_button = QPushButton("▶ Start")
        self.settings_button = QToolButton()
        self.settings_button.setText("⚙")
        self.settings_button.setToolTip(TIPS["settings"])
        row.addWidget(self.connection, 1)
        row.addWidget(self.backend_button)
        row.addWidget(self.settings_button)
        root.addLayout(row)

        self.dialog = SettingsDialog(self.controller, self)

    # --- wiring ------------------------------------------------------------------------------

    def _connect(self) -> None:
        c = self.controller
        self.mode.currentIndexChanged.connect(lambda _index: self._on_mode())
        self.source.currentIndexChanged.connect(lambda _index: self._set(source=self.source.currentData()))
        self.prompt.textChanged.connect(lambda: self._set(prompt=self.prompt.toPlainText()))
        self.strength.valueChanged.connect(self._on_strength)
        on_click(self.refine_button.clicked, c.refine)
        on_click(self.cancel_button.clicked, c.cancel)
        on_click(self.resubmit_button.clicked, c.resubmit)
        on_click(self.backend_button.clicked, self._toggle_backend)
        on_click(self.settings_button.clicked, self.open_settings)

        c.settings_changed.connect(self.show_settings)
        c.connection_changed.connect(self._on_connection)
        c.capabilities_changed.connect(self._on_capabilities)
        c.jobs_changed.connect(self._on_jobs)
        c.job_preview.connect(self._on_preview)
        c.notice.connect(self.messages.add)
        c.history_changed.connect(self.history.update_results)
        c.backend_changed.connect(self._on_backend)
        c.setup.finished.connect(lambda _ok, _text: self._update_backend_button())

    def _on_mode(self) -> None:
        self._set(mode=self.mode.currentData())

    def _on_strength(self, value: int) -> None:
        self.strength_value.setText(f"{value / 100:.2f}")
        self._set(**{self.controller.settings.strength_key: value / 100})  # Upscale has its own

    def _toggle_backend(self) -> None:
        if self.controller.backend.state.value in ("starting", "running"):
            self.controller.stop_backend()
        elif self._needs_setup():
            self.open_settings()
        else:
            self.controller.start_backend()

    def _needs_setup(self) -> bool:
        """Nothing to start yet: the command (as saved in ⚙) is the default one, which is not installed
        on this computer, and no setup was made."""
        command = self.controller.settings.backend_command
        default = Settings().backend_command
        return command == default and not self.controller.setup.set_up and shutil.which(default) is None

    def open_settings(self) -> None:
        self.dialog.open_dialog()

    def document_changed(self) -> None:
        """The view shown in Krita changed: show that document's results."""
        self.history.update_results()

    # --- controller -> view ------------------------------------------------------------------

    def show_settings(self, s: Settings) -> None:
        with self.showing():
            _select_data(self.mode, s.mode)
            _select_data(self.source, s.source)
            if self.prompt.toPlainText() != s.prompt:
                self.prompt.setPlainText(s.prompt)
            strength = getattr(s, s.strength_key)
            self.strength.setRange(*strength_range(s.mode))
            self.strength.setValue(round(strength * 100))
            self.strength_value.setText(f"{strength:.2f}")
        self.upscale.show_settings(s)
        self.advanced.show_settings(s)
        self.dialog.show_settings(s)
        self._update_backend_button()  # "Set up…" until a backend command is set

    def _on_connection(self, state: str, detail: str) -> None:
        self._connection = (state, detail)
        connected = state == "connected"
        caps = self.controller.client.capabilities if connected else {}
        short = _short_backend(caps) if caps else detail
        backend = describe_backend(self.controller.client.server, caps) if connected else ""
        whole = f"{state} — {detail}" if detail and detail != state else state  # as the line says it, uncut
        self.connection.show_state(state, short, "\n".join(t for t in (whole, backend) if t))
        self.dialog.show_connection(state, detail, backend)
        self._update_backend_button()

    def _on_capabilities(self, server: str, caps: dict) -> None:
        self._on_connection(*self._connection)
        supported = set(self.controller.supported_modes)
        model = self.mode.model()
        for row in range(self.mode.count()):
            item = model.item(row)
            ok = self.mode.itemData(row) in supported
            item.setEnabled(ok)
            upscale = self.mode.itemData(row) == "upscale"
            why = "This backend cannot upscale: update it" if upscale else "This backend has no base model for it"
            item.setToolTip("" if ok else why)
        self.upscale.show_capabilities(caps)
        if self.mode.currentData() not in supported and "refine" in supported:
            _select_data(self.mode, "refine")

    def _on_jobs(self) -> None:
        jobs = self.controller.jobs
        job = jobs.current()
        unfinished = jobs.unfinished()
        self.cancel_button.setEnabled(bool(unfinished))
        self.resubmit_button.setVisible(bool(jobs.lost()))
        self.advanced.show_last_seed()
        self.history.update_jobs()
        if job is None:
            self._progress(0, 1, 0, "Ready")
            return
        more = f" (+{len(unfinished) - 1} queued)" if len(unfinished) > 1 else ""
        text = job.status_text + more
        if job.state is JobState.running and job.total:
            self._progress(0, job.total, min(job.step, job.total), text)
        elif job.upload_percent is not None:
            self._progress(0, 100, job.upload_percent, text)  # a large layer going up
        elif job.state is JobState.done:
            self._progress(0, max(1, job.total), max(1, job.total), text)
        elif unfinished:
            self._progress(0, 0, 0, text)  # busy: waiting, sent or queued
        else:
            self._progress(0, 1, 0, text)

    def _progress(self, lo: int, hi: int, value: int, text: str) -> None:
        self.progress.setRange(lo, hi)
        self.progress.setValue(value)
        self.progress.setFormat(text)
        self.progress.setToolTip(text)

    def _on_preview(self, job_id: str, image: QImage) -> None:
        if self.controller.settings.preview:
            self.history.set_preview(job_id, image)

    def _on_backend(self, state: str, detail: str) -> None:
        self.dialog.show_backend(state, detail)
        if state == "failed":
            self.messages.add(f"Local backend: {detail}. Its output is in the connection settings (⚙).", "error")
        self._update_backend_button()

    def _update_backend_button(self) -> None:
        ours = self.controller.backend.state.value in ("starting", "running", "stopping")
        setup = not ours and self._needs_setup()
        self.backend_button.setText("■ Stop" if ours else "Set up…" if setup else "▶ Start")
        self.backend_button.setEnabled(self.controller.backend.state.value != "stopping")
        self.backend_button.setVisible(ours or self._connection[0] != "connected")
        s = self.controller.settings
        self.backend_button.setToolTip(
            "Stop the local backend Krita started"
            if ours
            else "Set up a local backend on this computer (Python, PyTorch, the models): shows what it does first"
            if setup
            else f"Start the local backend: {s.backend_command} {s.backend_args} (the command is set in ⚙)"
        )


class MessagePanel(QWidget):
    """Shown instead of the refiner when it cannot run (e.g. no pyzmq build for this Python)."""

    def __init__(self, message: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        label = wrap_label(message)
        label.setStyleSheet("color: #e05050")
        layout.addWidget(label)
        layout.addStretch(1)


def _short_backend(caps: dict) -> str:
    """``cuda · NVIDIA H100`` / ``cpu · demo``: the connection line's summary of the backend."""
    parts = [str(caps.get("device") or "")]
    if caps.get("gpu"):
        parts.append(str(caps["gpu"]))
    models = caps.get("models")
    if isinstance(models, list) and any(isinstance(m, dict) and m.get("source") == "demo" for m in models):
        parts.append("demo model")
    return " · ".join(p for p in parts if p)


def _select_data(combo: QComboBox, value: Any) -> None:
    index = combo.findData(value)
    if index >= 0 and index != combo.currentIndex():
        combo.setCurrentIndex(index)
