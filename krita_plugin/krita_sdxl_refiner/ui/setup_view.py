"""The connection dialog's "Set up a local backend" section: folder, options, the plan (what it will do
and download), Check / Set up (Update) / Repair / Cancel, each step's state, progress and the log.

Nothing runs before a click: Check only looks at the computer; Set up shows the same plan first. The
folder and options are saved with the dialog's OK (or when Set up / Repair runs with them); Check uses
them as typed and saves nothing.
"""

from __future__ import annotations

from pathlib import Path

from PyQt5.QtCore import Qt
from PyQt5.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QWidget,
)

from krita_sdxl.backend.setup.plan import hub, torch_builds
from krita_sdxl.backend.setup.plan.space import human

from ..workflow.controller import Controller
from .fit_text import FittingText
from .slots import on_click
from .widgets import ElidedLabel, wrap_label

MARKS = {"pending": "•", "running": "▶", "done": "✓", "failed": "✗", "cancelled": "■"}
BUILD_LABELS = {"auto": "Automatic (from the GPU found)", "cpu": "CPU only (slow)"}
MB = 1_000_000


class SetupView(QGroupBox):
    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__("Set up a local backend (Python, PyTorch, the models, on this computer)", parent)
        self.controller = controller
        self.runner = controller.setup
        form = QFormLayout(self)
        self.folder = QLineEdit()
        self.folder.setToolTip("Where the backend's Python environment and the setup log go (models: the Hugging "
                               "Face cache)")  # fmt: skip
        self.browse = QPushButton("Browse…")
        self.browse.setAutoDefault(False)  # Enter in a field of the dialog must not open a file dialog
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(self.browse)
        form.addRow("Folder", row)
        self.base = QCheckBox(f"Also the SDXL base, for Generate and Two-stage (about {human(hub.BASE.approx_bytes)})")
        form.addRow("", self.base)
        self.torch = QComboBox()
        for build in torch_builds.BUILDS:
            self.torch.addItem(BUILD_LABELS.get(build, build), build)
        self.torch.setToolTip("Which PyTorch build to install; Automatic reads the NVIDIA driver (nvidia-smi) or ROCm")
        form.addRow("PyTorch", self.torch)
        self.plan = FittingText()  # every line shown, the totals last: the dialog scrolls, not the plan
        form.addRow(self.plan)
        self.steps = wrap_label()
        form.addRow(self.steps)
        self.bar = QProgressBar()
        self.bar.setTextVisible(False)
        self.detail = ElidedLabel()
        form.addRow(self.bar)
        form.addRow(self.detail)
        self.message = wrap_label()
        form.addRow(self.message)
        for label in (self.steps, self.message):
            label.setTextFormat(Qt.RichText)
        row = QHBoxLayout()
        self.check_button = QPushButton("Check")
        self.check_button.setToolTip("Look at this computer and show what Set up will do and download")
        self.run_button = QPushButton("Set up")
        self.repair_button = QPushButton("Repair")
        self.repair_button.setToolTip(
            "Run every step again (packages reinstalled, every model file verified); once something is set up"
        )
        self.cancel_button = QPushButton("Cancel")
        self.log_button = QPushButton("Show log")
        self.log_button.setCheckable(True)
        for button in (self.check_button, self.run_button, self.repair_button, self.cancel_button, self.log_button):
            button.setAutoDefault(False)
            row.addWidget(button)
        row.addStretch(1)
        form.addRow(row)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(2000)
        self.log.setFixedHeight(160)
        self.log.hide()
        form.addRow(self.log)
        self._plan_html = ""
        self._wire()
        self.show_settings()
        self.refresh()

    def _wire(self) -> None:
        on_click(self.browse.clicked, self._browse)
        on_click(self.check_button.clicked, self.check)
        on_click(self.run_button.clicked, lambda: self.start("install"))
        on_click(self.repair_button.clicked, lambda: self.start("repair"))
        on_click(self.cancel_button.clicked, self.runner.cancel)
        on_click(self.log_button.clicked, self._toggle_log)
        self.folder.editingFinished.connect(self._configure)
        self.base.toggled.connect(lambda _on: self._configure())
        self.torch.currentIndexChanged.connect(lambda _i: self._configure())
        self.runner.changed.connect(self.refresh)
        self.runner.output.connect(self._on_output)

    # --- settings ---------------------------------------------------------------------------------

    def chosen_folder(self) -> Path:
        return self.runner.folder_of(self.folder.text())

    def show_settings(self) -> None:
        s = self.controller.settings
        self.folder.setText(s.setup_folder or str(self.runner.default_folder))
        self.base.setChecked(s.setup_base)
        index = self.torch.findData(s.setup_torch)
        self.torch.setCurrentIndex(max(index, 0))
        self.runner.configure(self.chosen_folder(), s.setup_base, s.setup_torch)

    def choices(self) -> dict[str, object]:
        """The folder and options as shown, as settings (saved by the dialog's OK)."""
        return {"setup_folder": str(self.chosen_folder()), "setup_base": self.base.isChecked(),
                "setup_torch": self.torch.currentData()}  # fmt: skip

    def _configure(self) -> None:
        """The runner works with what is shown (Check, and whether this folder is set up); nothing is saved."""
        self.runner.configure(self.chosen_folder(), self.base.isChecked(), self.torch.currentData())

    def _browse(self) -> None:
        chosen = QFileDialog.getExistingDirectory(self, "Folder for the local backend", str(self.chosen_folder()))
        if chosen:
            self.folder.setText(chosen)
            self._configure()

    # --- actions ----------------------------------------------------------------------------------

    def check(self) -> None:
        self._configure()
        self.runner.check()

    def start(self, mode: str) -> None:
        """Set up / Update / Repair: they write into the folder, so its choice is saved now."""
        self._configure()
        self.controller.update_settings(**self.choices())
        if self.log.isVisible():
            self.log.clear()
        self.runner.run(mode)

    def _toggle_log(self) -> None:
        shown = self.log_button.isChecked()
        self.log.setVisible(shown)
        self.log_button.setText("Hide log" if shown else "Show log")
        if shown:
            self.log.setPlainText(self.runner.log_text())
            self.log.verticalScrollBar().setValue(self.log.verticalScrollBar().maximum())

    def _on_output(self, line: str) -> None:
        if self.log.isVisible():
            self.log.appendPlainText(line)

    # --- runner -> view ---------------------------------------------------------------------------

    def refresh(self) -> None:
        r = self.runner
        busy = r.busy
        for widget in (self.folder, self.browse, self.base, self.torch, self.check_button):
            widget.setEnabled(not busy)
        self.repair_button.setEnabled(not busy and r.started)  # nothing to repair before a step is done
        self.run_button.setEnabled(not busy and r.phase != "blocked")
        self.cancel_button.setEnabled(busy)
        self.run_button.setText("Update" if r.set_up else "Set up")
        self.run_button.setToolTip("Run the steps that are not done (or out of date): nothing is downloaded twice")
        if r.problem is not None:
            html = f"<b>Cannot set up:</b> {_html(r.problem.why)} {_html(r.problem.what)}"
        elif r.plan is not None:
            html = _html(r.plan.describe()).replace("\n", "<br>")
        elif r.phase == "checking":
            html = "Looking at this computer …"
        else:
            html = "Check shows what Set up will do and how much it downloads; nothing runs before you click Set up."
        if html != self._plan_html:  # keep the reader's scroll position while nothing changes
            self._plan_html = html
            self.plan.setHtml(html)
        self._show_steps()
        self._show_progress()
        self._show_message()

    def _show_steps(self) -> None:
        r = self.runner
        if r.plan is None or r.phase in ("idle", "checking", "ready", "blocked"):
            _show(self.steps, "")
            return
        lines = [f"{MARKS.get(r.status.get(s.key, ''), ' ')} {_html(s.title)}" for s in r.plan.steps]
        lines += [f"<span style='color:#d7a000'>⚠ {_html(w)}</span>" for w in r.warnings[len(r.plan.warnings) :]]
        _show(self.steps, "<br>".join(lines))

    def _show_progress(self) -> None:
        r = self.runner
        self.bar.setVisible(r.busy)
        self.detail.setText(r.detail if r.busy else "")
        self.detail.setVisible(r.busy)  # an empty row still takes a line: no gap under the plan
        if r.progress is not None and r.progress[1] > 0:
            done, total = r.progress
            self.bar.setRange(0, max(1, total // MB))
            self.bar.setValue(min(done, total) // MB)
        else:
            self.bar.setRange(0, 0)  # busy

    def _show_message(self) -> None:
        r = self.runner
        mismatch = self.controller.backend_mismatch
        if r.failure is not None and r.phase == "failed":
            text, color = f"{r.failure.text}", "#e05050"
        elif r.phase in ("done", "cancelled"):
            text, color = r.message, "#3fa34d" if r.phase == "done" else "#d7a000"
        elif mismatch:
            text, color = mismatch, "#d7a000"
        else:
            text, color = "", ""
        _show(self.message, f"<span style='color:{color}'>{_html(text)}</span>" if text else "")


def _show(label: QWidget, html: str) -> None:
    """A label shown with its text, or hidden when it has none (an empty row would leave a gap)."""
    label.setText(html)  # type: ignore[attr-defined]
    label.setVisible(bool(html))


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
