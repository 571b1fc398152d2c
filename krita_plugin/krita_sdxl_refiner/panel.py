"""The docker's content: every control of the refiner, bound to a :class:`Controller`.

Pure PyQt5 (runs offscreen in tests). Edits go straight to the controller, which persists them.
"""

from __future__ import annotations

from typing import Any

from PyQt5.QtCore import QRegularExpression, Qt
from PyQt5.QtGui import QImage, QPixmap, QRegularExpressionValidator
from PyQt5.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .controller import Controller
from .jobs import JobState
from .plan import MODE_LABELS
from .settings import Settings
from .widgets import Collapsible, describe_backend, notice_html, state_text, wrap_label

SOURCES = (("Active layer", "layer"), ("Visible image", "canvas"))
PREVIEW_SIZE = 192


class RefinerPanel(QWidget):
    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self._loading = False
        self._build()
        self._connect()
        self._show_settings(controller.settings)
        self._on_connection(controller.client.state.value, controller.client.detail)
        if controller.client.capabilities:
            self._on_capabilities(controller.client.server, controller.client.capabilities)
        self._on_backend(controller.backend.state.value, controller.backend.detail)
        self._on_jobs()
        self._on_results()

    # --- layout ------------------------------------------------------------------------------

    def _build(self) -> None:
        root = QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)

        self.endpoint = QLineEdit()
        self.endpoint.setPlaceholderText("tcp://127.0.0.1:5588")
        self.connection = wrap_label()
        self.backend_info = wrap_label()
        font = self.backend_info.font()
        font.setPointSizeF(font.pointSizeF() * 0.9)
        self.backend_info.setFont(font)
        conn = QFormLayout()
        conn.addRow("Backend", self.endpoint)
        root.addLayout(conn)
        root.addWidget(self.connection)
        root.addWidget(self.backend_info)
        root.addWidget(self._build_local_backend())
        root.addWidget(self._build_security())

        form = QFormLayout()
        self.mode = QComboBox()
        for mode, label in MODE_LABELS.items():
            self.mode.addItem(label, mode)
        self.source = QComboBox()
        for label, value in SOURCES:
            self.source.addItem(label, value)
        form.addRow("Mode", self.mode)
        form.addRow("Source", self.source)
        root.addLayout(form)

        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Prompt (optional): what the image shows")
        self.prompt.setFixedHeight(64)
        self.negative = QLineEdit()
        self.negative.setPlaceholderText("Negative prompt")
        root.addWidget(self.prompt)
        root.addWidget(self.negative)

        params = QFormLayout()
        self.strength = QSlider(Qt.Horizontal)
        self.strength.setRange(1, 100)
        self.strength_value = QLabel()
        self.strength_value.setMinimumWidth(32)
        row = QHBoxLayout()
        row.addWidget(self.strength)
        row.addWidget(self.strength_value)
        params.addRow("Strength", row)
        self.steps = QSpinBox()
        self.steps.setRange(1, 500)
        self.guidance = QDoubleSpinBox()
        self.guidance.setRange(0.0, 50.0)
        self.guidance.setSingleStep(0.5)
        row = QHBoxLayout()
        row.addWidget(self.steps)
        row.addWidget(QLabel("Guidance"))
        row.addWidget(self.guidance)
        params.addRow("Steps", row)
        self.random_seed = QCheckBox("Random")
        self.seed = QLineEdit()
        self.seed.setValidator(QRegularExpressionValidator(QRegularExpression(r"\d{0,20}")))
        self.seed.setPlaceholderText("fixed seed")
        self.last_seed = QPushButton("last: –")
        self.last_seed.setFlat(True)
        self.last_seed.setToolTip("The seed of the last job; click to use it as the fixed seed")
        row = QHBoxLayout()
        row.addWidget(self.random_seed)
        row.addWidget(self.seed)
        row.addWidget(self.last_seed)
        params.addRow("Seed", row)
        self.preview_toggle = QCheckBox("Show live preview")
        params.addRow("", self.preview_toggle)
        root.addLayout(params)
        root.addWidget(self._build_advanced())

        buttons = QHBoxLayout()
        self.refine_button = QPushButton("Refine")
        self.refine_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.resubmit_button = QPushButton("Resubmit")
        self.resubmit_button.setToolTip("Run again the jobs the backend lost when it went away, as they were")
        self.resubmit_button.hide()
        buttons.addWidget(self.refine_button, 2)
        buttons.addWidget(self.cancel_button, 1)
        buttons.addWidget(self.resubmit_button, 1)
        root.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setFormat("step %v/%m")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        root.addWidget(self.progress)
        self.status = wrap_label()
        root.addWidget(self.status)
        self.preview = QLabel()
        self.preview.setAlignment(Qt.AlignCenter)
        self.preview.setMinimumHeight(0)
        self.preview.hide()
        root.addWidget(self.preview)
        root.addWidget(self._build_results())
        root.addStretch(1)

    def _build_local_backend(self) -> QWidget:
        box = QWidget()
        form = QFormLayout(box)
        form.setContentsMargins(0, 0, 0, 0)
        self.backend_command = QLineEdit()
        self.backend_command.setToolTip("The krita-sdxl command, or a Python that has krita-sdxl installed")
        self.backend_args = QLineEdit()
        self.backend_args.setToolTip("Arguments, e.g. serve --demo (the endpoint above is added)")
        form.addRow("Command", self.backend_command)
        form.addRow("Arguments", self.backend_args)
        row = QHBoxLayout()
        self.backend_start = QPushButton("Start")
        self.backend_stop = QPushButton("Stop")
        row.addWidget(self.backend_start)
        row.addWidget(self.backend_stop)
        form.addRow("", row)
        self.backend_state = wrap_label()
        form.addRow(self.backend_state)
        self.backend_log = QPlainTextEdit()
        self.backend_log.setReadOnly(True)
        self.backend_log.setMaximumBlockCount(400)
        self.backend_log.setFixedHeight(120)
        self.backend_log.hide()
        form.addRow(self.backend_log)
        self.local_section = Collapsible("Local backend", box)
        return self.local_section

    def _build_security(self) -> QWidget:
        box = QWidget()
        form = QFormLayout(box)
        form.setContentsMargins(0, 0, 0, 0)
        self.server_key = QLineEdit()
        self.server_key.setPlaceholderText("40 characters, from the service's server.key")
        self.server_key.setToolTip("Only for a backend on another machine (CURVE); empty for this machine")
        self.client_key = QLineEdit()
        self.client_key.setPlaceholderText("path of this client's .key_secret file")
        form.addRow("Server key", self.server_key)
        form.addRow("Client key", self.client_key)
        return Collapsible("Remote backend keys", box)

    def _build_advanced(self) -> QWidget:
        box = QWidget()
        form = QFormLayout(box)
        form.setContentsMargins(0, 0, 0, 0)
        self.feather = QDoubleSpinBox()
        self.feather.setRange(0.0, 0.5)
        self.feather.setSingleStep(0.01)
        self.feather.setToolTip("Feather of the selection edge: share of the selection's diagonal (× strength)")
        self.padding = QDoubleSpinBox()
        self.padding.setRange(0.0, 1.0)
        self.padding.setSingleStep(0.01)
        self.padding.setToolTip("Context around the selection: share of its diagonal")
        form.addRow("Feather", self.feather)
        form.addRow("Padding", self.padding)
        return Collapsible("Selection edges", box)

    def _build_results(self) -> QWidget:
        self.results_box = QWidget()
        layout = QVBoxLayout(self.results_box)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel("Results not applied (their document or layer was gone):"))
        self.results = QListWidget()
        self.results.setMaximumHeight(110)
        layout.addWidget(self.results)
        row = QHBoxLayout()
        self.result_apply = QPushButton("Apply here")
        self.result_apply.setToolTip("Add as a layer of the active document, above the active layer")
        self.result_open = QPushButton("Open")
        self.result_open.setToolTip("Open as a new document (then save it as PNG, KRA...)")
        self.result_discard = QPushButton("Discard")
        for b in (self.result_apply, self.result_open, self.result_discard):
            row.addWidget(b)
        layout.addLayout(row)
        return self.results_box

    # --- wiring ------------------------------------------------------------------------------

    def _connect(self) -> None:
        c = self.controller
        self.endpoint.editingFinished.connect(lambda: self._set(endpoint=self.endpoint.text()))
        self.mode.currentIndexChanged.connect(lambda _: self._set(mode=self.mode.currentData()))
        self.source.currentIndexChanged.connect(lambda _: self._set(source=self.source.currentData()))
        self.prompt.textChanged.connect(lambda: self._set(prompt=self.prompt.toPlainText()))
        self.negative.textChanged.connect(lambda text: self._set(negative_prompt=text))
        self.strength.valueChanged.connect(self._on_strength)
        self.steps.valueChanged.connect(lambda v: self._set(steps=v))
        self.guidance.valueChanged.connect(lambda v: self._set(guidance=v))
        self.random_seed.toggled.connect(self._on_seed_edit)
        self.seed.editingFinished.connect(self._on_seed_edit)
        self.last_seed.clicked.connect(self._use_last_seed)
        self.preview_toggle.toggled.connect(lambda v: self._set(preview=v))
        self.feather.valueChanged.connect(lambda v: self._set(feather_fraction=v))
        self.padding.valueChanged.connect(lambda v: self._set(padding_fraction=v))
        self.backend_command.editingFinished.connect(lambda: self._set(backend_command=self.backend_command.text()))
        self.backend_args.editingFinished.connect(lambda: self._set(backend_args=self.backend_args.text()))
        self.server_key.editingFinished.connect(lambda: self._set(server_public_key=self.server_key.text()))
        self.client_key.editingFinished.connect(lambda: self._set(client_secret_key=self.client_key.text()))
        self.refine_button.clicked.connect(c.refine)
        self.cancel_button.clicked.connect(c.cancel)
        self.resubmit_button.clicked.connect(c.resubmit)
        self.backend_start.clicked.connect(self._start_backend)
        self.backend_stop.clicked.connect(c.stop_backend)
        self.result_apply.clicked.connect(lambda: self._on_result_action(c.apply_result))
        self.result_open.clicked.connect(lambda: self._on_result_action(c.open_result))
        self.result_discard.clicked.connect(lambda: self._on_result_action(c.discard_result))

        c.settings_changed.connect(self._show_settings)
        c.connection_changed.connect(self._on_connection)
        c.capabilities_changed.connect(self._on_capabilities)
        c.jobs_changed.connect(self._on_jobs)
        c.preview_ready.connect(self._on_preview)
        c.notice.connect(self._on_notice)
        c.results_changed.connect(self._on_results)
        c.backend_changed.connect(self._on_backend)
        c.backend_output.connect(self.backend_log.appendPlainText)

    def _set(self, **changes: Any) -> None:
        if not self._loading:
            self.controller.update_settings(**changes)

    def _on_strength(self, value: int) -> None:
        self.strength_value.setText(f"{value / 100:.2f}")
        self._set(strength=value / 100)

    def _on_seed_edit(self, *_: Any) -> None:
        self.seed.setEnabled(not self.random_seed.isChecked())
        if self.random_seed.isChecked():
            self._set(seed=-1)
        elif self.seed.text():
            self._set(seed=int(self.seed.text()))
        elif self.controller.last_seed is not None:
            self._use_last_seed()
        else:
            self._set(seed=0)

    def _use_last_seed(self) -> None:
        if self.controller.last_seed is not None:
            self.random_seed.setChecked(False)
            self.seed.setText(str(self.controller.last_seed))
            self._set(seed=self.controller.last_seed)

    def _start_backend(self) -> None:
        self._set(backend_command=self.backend_command.text(), backend_args=self.backend_args.text())
        self.backend_log.clear()
        self.controller.start_backend()

    def _on_result_action(self, action: Any) -> None:
        item = self.results.currentItem() or self.results.item(0)
        if item is not None:
            action(item.data(Qt.UserRole))

    # --- controller -> view ------------------------------------------------------------------

    def _show_settings(self, s: Settings) -> None:
        self._loading = True
        try:
            if self.endpoint.text() != s.endpoint and not self.endpoint.hasFocus():
                self.endpoint.setText(s.endpoint)
            _select_data(self.mode, s.mode)
            _select_data(self.source, s.source)
            if self.prompt.toPlainText() != s.prompt:
                self.prompt.setPlainText(s.prompt)
            if self.negative.text() != s.negative_prompt:
                self.negative.setText(s.negative_prompt)
            self.strength.setValue(round(s.strength * 100))
            self.strength_value.setText(f"{s.strength:.2f}")
            self.steps.setValue(s.steps)
            self.guidance.setValue(s.guidance)
            self.random_seed.setChecked(s.random_seed)
            self.seed.setEnabled(not s.random_seed)
            if not s.random_seed and self.seed.text() != str(s.seed):
                self.seed.setText(str(s.seed))
            self.preview_toggle.setChecked(s.preview)
            self.feather.setValue(s.feather_fraction)
            self.padding.setValue(s.padding_fraction)
            if self.backend_command.text() != s.backend_command:
                self.backend_command.setText(s.backend_command)
            if self.backend_args.text() != s.backend_args:
                self.backend_args.setText(s.backend_args)
            if self.server_key.text() != s.server_public_key:
                self.server_key.setText(s.server_public_key)
            if self.client_key.text() != s.client_secret_key:
                self.client_key.setText(s.client_secret_key)
        finally:
            self._loading = False
        if not s.preview:
            self.preview.hide()

    def _on_connection(self, state: str, detail: str) -> None:
        self.connection.setText(state_text(state, detail))
        if state != "connected":
            self.backend_info.setText("")

    def _on_capabilities(self, server: str, caps: dict) -> None:
        self.backend_info.setText(describe_backend(server, caps))
        supported = set(self.controller.supported_modes)
        model = self.mode.model()
        for row in range(self.mode.count()):
            item = model.item(row)
            ok = self.mode.itemData(row) in supported
            item.setEnabled(ok)
            item.setToolTip("" if ok else "This backend does not support this mode yet")
        if self.mode.currentData() not in supported and "refine" in supported:
            _select_data(self.mode, "refine")
            self._set(mode="refine")

    def _on_jobs(self) -> None:
        job = self.controller.jobs.current()
        busy = bool(self.controller.jobs.unfinished())
        self.cancel_button.setEnabled(busy)
        self.resubmit_button.setVisible(bool(self.controller.jobs.lost()))
        if self.controller.last_seed is not None:
            self.last_seed.setText(f"last: {self.controller.last_seed}")
        if job is None:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            return
        if job.state is JobState.running and job.total:
            self.progress.setRange(0, job.total)
            self.progress.setValue(min(job.step, job.total))
        elif job.state is JobState.done:
            self.progress.setRange(0, max(1, job.total))
            self.progress.setValue(max(1, job.total))
        elif busy:
            self.progress.setRange(0, 0)  # busy: waiting, sent or queued
        else:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
        queued = len(self.controller.jobs.unfinished())
        more = f" (+{queued - 1} queued)" if queued > 1 else ""
        if job.state is not JobState.failed:  # failures stay visible as notices
            self.status.setText(notice_html(job.status_text + more, "info"))

    def _on_preview(self, image: QImage) -> None:
        if not self.controller.settings.preview:
            return
        pixmap = QPixmap.fromImage(image)
        pixmap = pixmap.scaled(PREVIEW_SIZE, PREVIEW_SIZE, Qt.KeepAspectRatio, Qt.SmoothTransformation)
        self.preview.setPixmap(pixmap)
        self.preview.show()

    def _on_notice(self, text: str, level: str) -> None:
        self.status.setText(notice_html(text, level))

    def _on_results(self) -> None:
        self.results.clear()
        for item in self.controller.results:
            entry = QListWidgetItem(item.label)
            entry.setToolTip(f"Not applied: {item.reason}")
            entry.setData(Qt.UserRole, item.job_id)
            self.results.addItem(entry)
        self.results_box.setVisible(len(self.controller.results) > 0)
        if self.results.count():
            self.results.setCurrentRow(self.results.count() - 1)

    def _on_backend(self, state: str, detail: str) -> None:
        self.backend_state.setText(state_text(state, detail))
        running = state in ("starting", "running", "stopping")
        self.backend_start.setEnabled(not running)
        self.backend_stop.setEnabled(running)
        if state == "failed":
            self.backend_log.setPlainText(self.controller.backend.log_tail())
            self.backend_log.show()
            self.local_section.set_expanded(True)
        elif state == "starting":
            self.backend_log.show()


class MessagePanel(QWidget):
    """Shown instead of the refiner when it cannot run (e.g. no pyzmq build for this Python)."""

    def __init__(self, message: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        label = wrap_label(message)
        label.setStyleSheet("color: #e05050")
        layout.addWidget(label)
        layout.addStretch(1)


def _select_data(combo: QComboBox, value: Any) -> None:
    index = combo.findData(value)
    if index >= 0 and index != combo.currentIndex():
        combo.setCurrentIndex(index)
