"""The connection settings' "Upscaler model" box: the local backend's upscaler file (``serve --upscaler``), and
Download, which fetches Real-ESRGAN x4plus into the models folder only when clicked, with progress and a
checksum (workflow/upscaler_download.py). The file is one of the dialog's fields (saved by OK or Apply, dropped by
Cancel); a finished download saves its file at once."""

from __future__ import annotations

from PyQt5.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QWidget,
)

from krita_sdxl.backend.setup.plan.space import human
from krita_sdxl.backend.setup.plan.upscalers import DEFAULT, SUFFIXES, file_problem

from ..workflow.controller import Controller
from .slots import on_click
from .widgets import wrap_label

MODEL_FILTER = f"Models ({' '.join('*' + suffix for suffix in SUFFIXES)})"  # the files the loader takes


class UpscalerSetup(QGroupBox):
    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__("Upscaler model (Upscale mode)", parent)
        self.controller = controller
        self.file = QLineEdit()
        self.file.setPlaceholderText("none: Lanczos")
        self.file.setToolTip(
            "An upscaler model file (.pth, .safetensors: ESRGAN, Real-ESRGAN, SwinIR, ...) the local backend "
            "enlarges with (serve --upscaler FILE). A remote backend has its own."
        )
        self.browse = QPushButton("…")
        self.download = QPushButton(f"Download {DEFAULT.title} ({human(DEFAULT.size)})")
        self.download.setToolTip(f"{DEFAULT.url} ({DEFAULT.licence}), checked against its published SHA-256, into "
                                 "the models folder of the setup folder")  # fmt: skip
        self.cancel = QPushButton("Cancel")
        for button in (self.browse, self.download, self.cancel):
            button.setAutoDefault(False)
        self.progress = QProgressBar()
        self.status = wrap_label()
        form = QFormLayout(self)
        row = QHBoxLayout()
        row.addWidget(self.file, 1)
        row.addWidget(self.browse)
        form.addRow("File", row)
        row = QHBoxLayout()
        row.addWidget(self.download, 1)
        row.addWidget(self.cancel)
        form.addRow("", row)
        form.addRow(self.progress)
        form.addRow(self.status)
        on_click(self.browse.clicked, self._browse)
        on_click(self.download.clicked, controller.download_upscaler)
        on_click(self.cancel.clicked, controller.upscaler_download.cancel)
        controller.upscaler_download.changed.connect(self.refresh)
        self.refresh()

    def problem(self) -> str | None:
        """Why the file as typed cannot be the local backend's upscaler (None: empty, or a model file to try)."""
        typed = self.file.text().strip()
        problem = file_problem(typed) if typed else None
        return f"Upscaler file: {problem} (leave it empty for Lanczos)" if problem else None

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Upscaler model", self.file.text(), MODEL_FILTER)
        if path:
            self.file.setText(path)  # saved with the dialog's other fields

    def refresh(self) -> None:
        job = self.controller.upscaler_download
        busy = job.busy
        self.download.setEnabled(not busy)
        self.cancel.setVisible(busy)
        self.progress.setVisible(busy or job.progress is not None)
        done, needed = job.progress or (0, 0)
        self.progress.setRange(0, 1000 if needed else 0)
        self.progress.setValue(int(1000 * done / needed) if needed else 0)
        self.status.setText(job.detail)
