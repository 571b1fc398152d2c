"""The connection settings, out of the docker's way: endpoint, keys for a remote backend, setting up a
local backend (:mod:`setup_view`) and the local backend process (command, arguments, Start/Stop, its output).

A Qt dialog as people expect one: OK saves what is typed and closes, Apply saves it and stays, Cancel
(Esc, the window's ✕) forgets it; nothing is saved before. Settings that cannot work (a mistyped endpoint,
a key of the wrong length) keep OK and Apply disabled, with the reason shown above them.
"""

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

from ..core.connection import settings_problems
from ..core.settings import Settings
from ..workflow.controller import Controller
from .setup_view import SetupView
from .slots import on_click
from .upscaler_setup import UpscalerSetup
from .widgets import escape, state_text, wrap_label

NO_BACKEND = "<span style='color:#888888'>none connected</span>"


class SettingsDialog(QDialog):
    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self._shown: dict[str, str] = {}
        self._keys_shown: tuple[str, str] | None = None  # the keys the authorize line was made for
        self.setWindowTitle("SDXL Refiner: connection")
        self.setMinimumWidth(460)
        outer = QVBoxLayout(self)
        scroll = QScrollArea()  # the sections are taller than a laptop's screen: they scroll, the buttons stay
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
        height = content.sizeHint().height() + 90
        if screen is not None:
            height = min(height, int(screen.availableGeometry().height() * 0.9))
        self.resize(max(520, content.sizeHint().width() + 40), height)
        self.problem = wrap_label()  # why OK is disabled
        self.problem.setStyleSheet("color: #e05050")
        self.problem.hide()
        outer.addWidget(self.problem)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel | QDialogButtonBox.Apply)
        self.ok_button = self.buttons.button(QDialogButtonBox.Ok)
        self.apply_button = self.buttons.button(QDialogButtonBox.Apply)
        self.cancel_button = self.buttons.button(QDialogButtonBox.Cancel)
        self.ok_button.setDefault(True)  # Enter in a field: OK
        outer.addWidget(self.buttons)
        self._wire()
        self.load(controller.settings)

    def _build_connection(self) -> QWidget:
        box = QGroupBox("Backend service")
        form = QFormLayout(box)
        self.endpoint = QLineEdit()
        self.endpoint.setPlaceholderText(DEFAULT_ENDPOINT)
        self.endpoint.setToolTip(
            "Where the krita-sdxl service listens: tcp://HOST:PORT (tcp://127.0.0.1:5588 on this computer), "
            "ipc for this user's private local socket, or ipc://PATH. OK or Apply connects to it."
        )
        self.connection = wrap_label()
        self.backend_info = wrap_label()
        self.backend_info.setToolTip("The backend this docker is connected to now, as it describes itself")
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
        self.authorize = wrap_label()
        self.authorize.setToolTip("Run this on the backend machine (paste it into a shell as it is)")
        form.addRow("Server key", self.server_key)
        form.addRow("Client key", self.client_key)
        form.addRow(self.authorize)
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
        self.backend_start.setToolTip("Apply the settings as typed here, then start the local backend")
        self.backend_stop = QPushButton("Stop")
        for button in (self.backend_start, self.backend_stop):
            button.setAutoDefault(False)  # Enter in a field is OK, never Start
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
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        on_click(self.apply_button.clicked, self.apply)
        for field in (self.endpoint, self.server_key, self.client_key, self.upscaler.file):
            field.textChanged.connect(lambda _text: self.validate())
        on_click(self.backend_start.clicked, self.start_backend)
        on_click(self.backend_stop.clicked, c.stop_backend)
        c.backend_output.connect(self.backend_log.appendPlainText)

    # --- OK / Apply / Cancel ------------------------------------------------------------------

    def open_dialog(self) -> None:
        """Show the dialog with the saved settings (edits a Cancel dropped are gone), or raise it when open."""
        if not self.isVisible():
            self.load(self.controller.settings, every_field=True)
            self.setup.show_settings()
            self.ok_button.setDefault(True)  # a button clicked last time (Cancel) took the default
            self.endpoint.setFocus()
        self.show()
        self.raise_()
        self.activateWindow()

    def typed(self) -> dict[str, Any]:
        """The settings as typed in the dialog."""
        return {
            "endpoint": self.endpoint.text().strip(),
            "server_public_key": self.server_key.text().strip(),
            "client_secret_key": self.client_key.text().strip(),
            "backend_command": self.backend_command.text().strip(),
            "backend_args": self.backend_args.text().strip(),
            "upscaler_file": self.upscaler.file.text().strip(),
            **self.setup.choices(),
        }

    def problems(self) -> list[str]:
        t = self.typed()
        problems = settings_problems(t["endpoint"], t["server_public_key"], t["client_secret_key"])
        upscaler = self.upscaler.problem()
        return [*problems, upscaler] if upscaler else problems

    def validate(self) -> bool:
        """Enable OK, Apply and Start when the typed settings can work; else say why."""
        problems = self.problems()
        self.problem.setText("\n".join(problems))
        self.problem.setVisible(bool(problems))
        for button in (self.ok_button, self.apply_button):
            button.setEnabled(not problems)
        self._enable_start()
        return not problems

    def apply(self) -> bool:
        """Save what is typed (the client connects to a new endpoint at once); False when it cannot work."""
        if not self.validate():
            return False
        self.controller.update_settings(**self.typed())
        return True

    def accept(self) -> None:
        if self.apply():
            super().accept()

    def reject(self) -> None:
        super().reject()
        self.setup.show_settings()  # the runner works with the saved folder again

    def start_backend(self) -> None:
        """Apply what is typed, then start the local backend with it."""
        if self.apply():
            self.backend_log.clear()
            self.controller.start_backend()

    # --- controller -> view --------------------------------------------------------------------

    def load(self, s: Settings, every_field: bool = False) -> None:
        """Show the settings. Without ``every_field``, only the values that changed since last shown: a
        field being typed into keeps what was typed when another setting is saved (Set up's command)."""
        for name, field, value in (
            ("endpoint", self.endpoint, s.endpoint),
            ("server_key", self.server_key, s.server_public_key),
            ("client_key", self.client_key, s.client_secret_key),
            ("backend_command", self.backend_command, s.backend_command),
            ("backend_args", self.backend_args, s.backend_args),
            ("upscaler_file", self.upscaler.file, s.upscaler_file),
        ):
            if every_field or self._shown.get(name) != value:
                self._shown[name] = value
                field.setText(value)
        if (s.server_public_key, s.client_secret_key) != self._keys_shown:  # reads a key file: only when they change
            self._keys_shown = (s.server_public_key, s.client_secret_key)
            line = self.controller.authorize_line()
            self.authorize.setText(f"On the backend machine run:<br><code>{escape(line)}</code>" if line else "")
            self.authorize.setVisible(bool(line))
        self.validate()

    show_settings = load

    def show_connection(self, state: str, detail: str, backend: str) -> None:
        """``backend``: what the backend connected now says of itself ("" when none is connected)."""
        self.connection.setText(state_text(state, detail))
        self.backend_info.setText(escape(backend).replace("\n", "<br>") if backend else NO_BACKEND)
        self.setup.refresh()  # a backend of another version asks for Update

    def show_backend(self, state: str, detail: str) -> None:
        self.backend_state.setText(state_text(state, detail))
        self._enable_start()
        if state == "failed":
            self.backend_log.setPlainText(self.controller.backend.log_tail())

    def _enable_start(self) -> None:
        running = self.controller.backend.state.value in ("starting", "running", "stopping")
        self.backend_start.setEnabled(not running and self.ok_button.isEnabled())
        self.backend_stop.setEnabled(running)
