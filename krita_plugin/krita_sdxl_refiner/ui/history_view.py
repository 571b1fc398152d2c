"""The docker's lower half: the queue (one row per unfinished or lost job, each with its own Cancel)
above the results history (one row per result, newest first, with a thumbnail and its actions).

Rows are kept by id and updated in place: a progress event changes two labels, not the list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from PyQt5.QtCore import Qt
from PyQt5.QtGui import QImage, QPixmap
from PyQt5.QtWidgets import (
    QCheckBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..core.history import Entry
from ..core.jobs import Job, JobState
from ..core.plan import MODE_LABELS, short_prompt
from ..workflow.controller import Controller
from .slots import on_click
from .widgets import ElidedLabel

THUMB = 56  # px shown in a row


def _small_button(text: str, tip: str) -> QToolButton:
    button = QToolButton()
    button.setText(text)
    button.setToolTip(tip)
    button.setAutoRaise(False)
    button.setToolButtonStyle(Qt.ToolButtonTextOnly)
    return button


class _Row(QFrame):
    def __init__(self) -> None:
        super().__init__()
        self.setFrameShape(QFrame.StyledPanel)
        self.thumb = QLabel()
        self.thumb.setFixedSize(THUMB, THUMB)
        self.thumb.setAlignment(Qt.AlignCenter)
        self.thumb.setStyleSheet("background: rgba(128, 128, 128, 40)")
        self.title = ElidedLabel()
        font = self.title.font()
        font.setBold(True)
        self.title.setFont(font)
        self.detail = ElidedLabel()
        self.where = ElidedLabel()  # results: when, and where it went (or why it was kept)
        self.where.hide()
        self.buttons = QHBoxLayout()
        self.buttons.setSpacing(2)
        text = QVBoxLayout()
        text.setSpacing(1)
        text.addWidget(self.title)
        text.addWidget(self.detail)
        text.addWidget(self.where)
        text.addLayout(self.buttons)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(3, 3, 3, 3)
        layout.setSpacing(6)
        layout.addWidget(self.thumb)
        layout.addLayout(text, 1)

    def set_image(self, image: QImage | None) -> None:
        if image is None or image.isNull():
            self.thumb.clear()
            return
        pixmap = QPixmap.fromImage(image).scaled(THUMB, THUMB, Qt.KeepAspectRatio, Qt.SmoothTransformation)
        self.thumb.setPixmap(pixmap)


class JobRow(_Row):
    """An unfinished job (waiting, sent, queued, running) or a lost one."""

    def __init__(self, controller: Controller, job: Job) -> None:
        super().__init__()
        self.job_id = job.id
        self.cancel_button = _small_button("Cancel", "Cancel this job")
        on_click(self.cancel_button.clicked, lambda: controller.cancel_job(self.job_id))
        self.buttons.addWidget(self.cancel_button)
        self.buttons.addStretch(1)
        self.title.setText(_job_title(job))
        self.setToolTip(f"{job.target.description}\nPrompt: {job.params.prompt or '(none)'}")

    def update_from(self, job: Job) -> None:
        self.detail.setText(job.status_text)
        lost = job.state is JobState.lost
        self.cancel_button.setText("Drop" if lost else "Cancel")
        self.cancel_button.setToolTip("Forget this lost job" if lost else "Cancel this job")


class ResultRow(_Row):
    def __init__(self, controller: Controller, entry: Entry) -> None:
        super().__init__()
        self.entry_id = entry.id
        eid = entry.id
        self.apply_button = _small_button("Apply", "Add as a new layer of the active document, above its active layer")
        self.open_button = _small_button("Open", "Open as a new document (to save it as PNG, KRA…)")
        self.again_button = _small_button(
            "Again", "Again with a new seed: the same pixels as captured for this result, the same settings"
        )
        self.discard_button = _small_button("✕", "Remove from the history (layers already added stay)")
        on_click(self.apply_button.clicked, lambda: controller.apply_result(eid))
        on_click(self.open_button.clicked, lambda: controller.open_result(eid))
        on_click(self.again_button.clicked, lambda: controller.again(eid))
        on_click(self.discard_button.clicked, lambda: controller.discard_result(eid))
        for button in (self.apply_button, self.open_button, self.again_button):
            self.buttons.addWidget(button)
        self.buttons.addStretch(1)
        self.buttons.addWidget(self.discard_button)
        self.update_from(entry)

    def update_from(self, entry: Entry) -> None:
        self.title.setText(_title(entry.number, entry.prompt, entry.mode))
        when = time.strftime("%H:%M", time.localtime(entry.created))
        seed = "?" if entry.seed is None else str(entry.seed)
        self.detail.setText(f"seed {seed} · strength {entry.strength:.2f}")
        self.where.setText(f"{when} · {entry.note}")
        self.where.setStyleSheet("color: #888888" if entry.applied else "color: #d7a000")
        self.where.show()
        took = f", {entry.elapsed:.1f} s" if entry.elapsed is not None else ""
        self.setToolTip(
            f"{entry.name}\n{entry.box.width}x{entry.box.height} px, {entry.fmt.label}{took}\n"
            f"From {entry.target.description}\n{entry.note}"
        )
        self.apply_button.setEnabled(entry.has_pixels)
        self.open_button.setEnabled(entry.has_pixels)
        self.again_button.setEnabled(entry.can_again)
        if not entry.can_again:
            self.again_button.setToolTip("The source pixels were dropped to save memory")
        self.set_image(entry.thumbnail)
        self.setStyleSheet("" if entry.applied else "ResultRow { border: 1px solid #d7a000 }")


def _job_title(job: Job) -> str:
    return _title(job.number, job.params.prompt, job.params.mode)


def _title(number: int, prompt: str, mode: str) -> str:
    """``#3 · a castle at dawn``: the number its layer's name starts with, then the prompt (or the mode)."""
    text = short_prompt(prompt, 60) or MODE_LABELS.get(mode, mode)
    return f"#{number} · {text}" if number > 0 else text


class HistoryView(QWidget):
    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.document_of_view: Callable[[], Any] = lambda: None  # the active document (set by the panel)
        self.job_rows: dict[str, JobRow] = {}
        self.result_rows: dict[str, ResultRow] = {}

        self.all_documents = QCheckBox("All documents")
        self.all_documents.setToolTip("Show the results of every document, not only of the one shown now")
        header = QHBoxLayout()
        header.setContentsMargins(0, 0, 0, 0)
        self.heading = QLabel("Results")
        header.addWidget(self.heading)
        header.addStretch(1)
        header.addWidget(self.all_documents)
        self.empty = QLabel("Every result of this session appears here, applied or not.")
        self.empty.setWordWrap(True)
        self.empty.setStyleSheet("color: #888888")
        self.rows = QVBoxLayout()
        self.rows.setContentsMargins(0, 0, 0, 0)
        self.rows.setSpacing(3)
        inner = QWidget()
        column = QVBoxLayout(inner)
        column.setContentsMargins(0, 0, 0, 0)
        column.addLayout(self.rows)
        column.addWidget(self.empty)
        column.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.scroll.setWidget(inner)
        self.scroll.setMinimumHeight(THUMB + 16)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addLayout(header)
        layout.addWidget(self.scroll, 1)
        self.all_documents.toggled.connect(lambda _checked: self.refresh())  # toggled(bool): argument dropped

    # --- what is shown -----------------------------------------------------------------------

    def shows(self, entry: Entry) -> bool:
        """Results of the document shown now; every document's with "All documents"; and always the
        results that were never applied (they wait for the artist)."""
        if self.all_documents.isChecked() or not entry.applied:
            return True
        document = self.document_of_view()
        return document is None or entry.belongs_to(document)

    def refresh(self) -> None:
        self.update_jobs()
        self.update_results()

    def update_jobs(self) -> None:
        jobs = [j for j in self.controller.jobs if not j.state.finished or j.state is JobState.lost]
        ids = {j.id for j in jobs}
        for job_id in [i for i in self.job_rows if i not in ids]:
            self._drop(self.job_rows.pop(job_id))
        for index, job in enumerate(jobs):
            row = self.job_rows.get(job.id)
            if row is None:
                row = self.job_rows[job.id] = JobRow(self.controller, job)
                self.rows.insertWidget(index, row)
            row.update_from(job)
        self._update_empty()

    def update_results(self) -> None:
        entries = self.controller.history.newest_first(self.shows)
        ids = {e.id for e in entries}
        for entry_id in [i for i in self.result_rows if i not in ids]:
            self._drop(self.result_rows.pop(entry_id))
        for index, entry in enumerate(entries):
            row = self.result_rows.get(entry.id)
            if row is None:
                row = self.result_rows[entry.id] = ResultRow(self.controller, entry)
            else:
                row.update_from(entry)
            position = len(self.job_rows) + index
            if self.rows.indexOf(row) != position:  # new, or moved down by a newer result
                self.rows.removeWidget(row)
                self.rows.insertWidget(position, row)
        hidden = len(self.controller.history) - len(entries)
        self.heading.setText(f"Results ({hidden} in other documents)" if hidden else "Results")
        self._update_empty()

    def set_preview(self, job_id: str, image: QImage) -> None:
        row = self.job_rows.get(job_id)
        if row is not None:
            row.set_image(image)

    def _drop(self, row: QWidget) -> None:
        self.rows.removeWidget(row)  # now, so that the positions of the other rows are right at once
        row.hide()
        row.deleteLater()

    def _update_empty(self) -> None:
        self.empty.setVisible(not self.job_rows and not self.result_rows)
