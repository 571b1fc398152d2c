"""The connection settings, out of the docker's way: endpoint, keys for a remote backend, setting up a
local backend (:mod:`setup_view`) and the local backend process (command, arguments, Start/Stop, its output)."""

from __future__ import annotations

from typing import Any

from PyQt5.QtGui import QGuiApplication
from PyQt5.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from krita_sdxl.protocol.endpoint import DEFAULT_ENDPOINT

from ..core.settings import Settings
from ..workflow.controller import Controller
from .setup_view import SetupView
from .slots import on_click
from .upscaler_setup import UpscalerSetup
from .widgets import state_text, wrap_label


class SettingsDialog(QDialog):
    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self._loading = False
        self._shown: dict[str, str] = {}
        self.setWindowTitle("SDXL Refiner: connection")
        self.setMinimumWidth(460)
        outer = QVBoxLayout(self)
        scroll = QScrollArea()  # the sections are taller than a laptop's screen: they scroll, Close stays
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        content = QWidget()
        root = QVBoxLayout(content)
        root.setContentsMargins(0, 0, 0, 0)
        root.addWidget(self._build_connection())
        self.setup = SetupView(controller)
        root.addWidget(self.setup)
        root.addWidget(self._build_backend())
        self.upscaler = UpscalerSetup(controller)  # the local backend's --upscaler, and its download
        root.addWidget(self.upscaler)
        root.addWidget(self._build_keys())
        root.addStretch(1)
        scroll.setWidget(content)
        outer.addWidget(scroll, 1)
        screen = QGuiApplication.primaryScreen()
        height = content.sizeHint().height() + 60
        if screen is not None:
            height = min(height, int(screen.availableGeometry().height() * 0.9))
        self.resize(max(520, content.sizeHint().width() + 40), height)
        close = QDialogButtonBox(QDialogButtonBox.Close)
        close.rejected.connect(self.close)
        for button in close.buttons():
            button.setAutoDefault(False)  # Enter in a field commits that field; it does not close the dialog
        outer.addWidget(close)
        self._wire()
        self.show_settings(controller.settings)

    def _build_connection(self) -> QWidget:
        box = QGroupBox("Backend service")
        form = QFormLayout(box)
        self.endpoint = QLineEdit()
        self.endpoint.setPlaceholderText(DEFAULT_ENDPOINT)
        self.endpoint.setToolTip(
            "Where the krita-sdxl service listens: tcp://HOST:PORT (tcp://127.0.0.1:5588 on this computer), "
            "ipc for this user's private local socket, or ipc://PATH. Press Enter to connect."
        )
        self.connection = wrap_label()
        self.backend_info = wrap_label()
        form.addRow("Endpoint", self.endpoint)
        form.addRow("State", self.connection)
        form.addRow("Backend", self.backend_info)
        return box

    def _build_keys(self) -> QWidget:
        box = QGroupBox("Keys, for a backend on another computer (CURVE)")
        form = QFormLayout(box)
        self.server_key = QLineEdit()
        self.server_key.setPlaceholderText("40 characters, from the service's server.key")
        self.server_key.setToolTip("Only for a backend on another machine; empty for this machine")
        self.client_key = QLineEdit()
        self.client_key.setPlaceholderText("created for you when you enter a server key")
        self.client_key.setToolTip("Path of this computer's .key_secret file")
        form.addRow("Server key", self.server_key)
        form.addRow("Client key", self.client_key)
        return box

    def _build_backend(self) -> QWidget:
        box = QGroupBox("Local backend (started by Krita)")
        form = QFormLayout(box)
        self.backend_command = QLineEdit()
        self.backend_command.setToolTip("The krita-sdxl command, or a Python that has krita-sdxl installed")
        self.backend_args = QLineEdit()
        self.backend_args.setToolTip("Arguments, e.g. serve --demo (the endpoint above is added)")
        form.addRow("Command", self.backend_command)
        form.addRow("Arguments", self.backend_args)
        row = QHBoxLayout()
        self.backend_start = QPushButton("Start")
        self.backend_stop = QPushButton("Stop")
        for button in (self.backend_start, self.backend_stop):
            button.setAutoDefault(False)
        row.addWidget(self.backend_start)
        row.addWidget(self.backend_stop)
        row.addStretch(1)
        form.addRow("", row)
        self.backend_state = wrap_label()
        form.addRow("State", self.backend_state)
        self.backend_log = QPlainTextEdit()
        self.backend_log.setReadOnly(True)
        self.backend_log.setMaximumBlockCount(400)
        self.backend_log.setFixedHeight(140)
        form.addRow(self.backend_log)
        return box

    def _wire(self) -> None:
        c = self.controller
        self.endpoint.editingFinished.connect(lambda: self._set(endpoint=self.endpoint.text()))
        self.server_key.editingFinished.connect(lambda: self._set(server_public_key=self.server_key.text()))
        self.client_key.editingFinished.connect(lambda: self._set(client_secret_key=self.client_key.text()))
        self.backend_command.editingFinished.connect(lambda: self._set(backend_command=self.backend_command.text()))
        self.backend_args.editingFinished.connect(lambda: self._set(backend_args=self.backend_args.text()))
        on_click(self.backend_start.clicked, self.start_backend)
        on_click(self.backend_stop.clicked, c.stop_backend)
        c.backend_output.connect(self.backend_log.appendPlainText)

    def _set(self, **changes: Any) -> None:
        if not self._loading:
            self.controller.update_settings(**changes)

    def start_backend(self) -> None:
        """Start with the command and arguments as they are typed now (editingFinished may not have fired)."""
        self._set(backend_command=self.backend_command.text(), backend_args=self.backend_args.text())
        self.backend_log.clear()
        self.controller.start_backend()

    def show_settings(self, s: Settings) -> None:
        """Show the values that changed since last shown; a field being typed into (not committed
        yet) keeps what was typed when another setting changes."""
        self._loading = True
        try:
            for name, field, value in (
                ("endpoint", self.endpoint, s.endpoint),
                ("server_key", self.server_key, s.server_public_key),
                ("client_key", self.client_key, s.client_secret_key),
                ("backend_command", self.backend_command, s.backend_command),
                ("backend_args", self.backend_args, s.backend_args),
            ):
                if self._shown.get(name) != value:
                    self._shown[name] = value
                    field.setText(value)
        finally:
            self._loading = False
        self.upscaler.show_settings(s)

    def show_connection(self, state: str, detail: str, backend: str) -> None:
        self.connection.setText(state_text(state, detail))
        self.backend_info.setText(backend)
        self.setup.refresh()  # a backend of another version asks for Update

    def show_backend(self, state: str, detail: str) -> None:
        self.backend_state.setText(state_text(state, detail))
        running = state in ("starting", "running", "stopping")
        self.backend_start.setEnabled(not running)
        self.backend_stop.setEnabled(running)
        if state == "failed":
            self.backend_log.setPlainText(self.controller.backend.log_tail())
