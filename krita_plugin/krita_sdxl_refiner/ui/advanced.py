"""The docker's folded "Advanced" section: negative prompt, steps, guidance, seed, selection edges,
the generate mode's hand-over point, keep-unmasked and the live preview. Edits go to the controller."""

from __future__ import annotations

from PyQt5.QtCore import QRegularExpression
from PyQt5.QtGui import QRegularExpressionValidator
from PyQt5.QtWidgets import (
    QAbstractSpinBox,
    QCheckBox,
    QDoubleSpinBox,
    QGridLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..core.settings import Settings
from ..workflow.controller import Controller
from .settings_view import SettingsView
from .slots import on_click

FIELD_WIDTH = 64  # px: spin boxes never shrink below a readable width

TIPS = {
    "negative": "What the result should not show (optional)",
    "steps": "Scheduler steps. Refine runs steps × strength of them (30 × 0.3 = 9); more steps, finer and slower",
    "guidance": "How closely the prompt is followed (classifier-free guidance); 5 is a good start, 0 ignores it",
    "seed": "A fixed seed repeats a result exactly; tick Random for a new one every time",
    "random": "A new random seed for every job (the seed used is shown with each result)",
    "last": "The seed of the last job; click to use it as the fixed seed",
    "feather": "Soft edge inside the selection: share of its diagonal (× strength). 0 = hard edge",
    "padding": "Context around the selection that the model sees: share of its diagonal",
    "denoising_end": "Generate mode: the share of the schedule the SDXL base paints before the refiner "
    "finishes it (0.8 = 80 % base, 20 % refiner; 1 = the base alone)",
    "keep_unmasked": "With a selection: the area outside it is held to your pixels while denoising, so the "
    "edge blends into what is really there. Off: the whole crop is refined and the selection only cuts it out",
    "preview": "Show a small picture of every step in the queue while a job runs",
}


def _spin(widget: QAbstractSpinBox, tip: str) -> QAbstractSpinBox:
    widget.setMinimumWidth(FIELD_WIDTH)
    widget.setToolTip(tip)
    return widget


class AdvancedSettings(SettingsView):
    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__(controller, parent)
        self._shown_seed: int | None = None
        self.negative = QLineEdit()
        self.negative.setPlaceholderText("Negative prompt")
        self.negative.setToolTip(TIPS["negative"])
        self.steps = _spin(QSpinBox(), TIPS["steps"])
        self.steps.setRange(1, 500)
        self.guidance = _spin(QDoubleSpinBox(), TIPS["guidance"])
        self.guidance.setRange(0.0, 50.0)
        self.guidance.setSingleStep(0.5)
        self.random_seed = QCheckBox("Random")
        self.random_seed.setToolTip(TIPS["random"])
        self.seed = QLineEdit()
        self.seed.setValidator(QRegularExpressionValidator(QRegularExpression(r"\d{0,20}")))
        self.seed.setPlaceholderText("seed")
        self.seed.setToolTip(TIPS["seed"])
        self.seed.setMinimumWidth(FIELD_WIDTH)
        self.last_seed = QPushButton("last: –")
        self.last_seed.setFlat(True)
        self.last_seed.setToolTip(TIPS["last"])
        self.feather = _spin(QDoubleSpinBox(), TIPS["feather"])
        self.feather.setRange(0.0, 0.5)
        self.feather.setSingleStep(0.01)
        self.padding = _spin(QDoubleSpinBox(), TIPS["padding"])
        self.padding.setRange(0.0, 1.0)
        self.padding.setSingleStep(0.01)
        self.denoising_end = _spin(QDoubleSpinBox(), TIPS["denoising_end"])
        self.denoising_end.setRange(0.05, 1.0)
        self.denoising_end.setSingleStep(0.05)
        self.keep_unmasked = QCheckBox("Keep outside")
        self.keep_unmasked.setToolTip(TIPS["keep_unmasked"])
        self.preview = QCheckBox("Live preview")
        self.preview.setToolTip(TIPS["preview"])

        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setHorizontalSpacing(4)
        grid.setVerticalSpacing(3)
        grid.addWidget(self.negative, 0, 0, 1, 4)
        self._pair(grid, 1, 0, "Steps", self.steps, "steps")
        self._pair(grid, 1, 2, "Guidance", self.guidance, "guidance")
        self._pair(grid, 2, 0, "Seed", self.seed, "seed")
        grid.addWidget(self.random_seed, 2, 2)
        grid.addWidget(self.last_seed, 2, 3)
        self._pair(grid, 3, 0, "Feather", self.feather, "feather")
        self._pair(grid, 3, 2, "Padding", self.padding, "padding")
        self._pair(grid, 4, 0, "Base until", self.denoising_end, "denoising_end")
        grid.addWidget(self.keep_unmasked, 4, 2, 1, 2)
        grid.addWidget(self.preview, 5, 0, 1, 4)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 1)
        self._wire()

    @staticmethod
    def _pair(grid: QGridLayout, row: int, column: int, text: str, field: QWidget, tip: str) -> None:
        label = QLabel(text)
        label.setToolTip(TIPS[tip])
        label.setBuddy(field)
        grid.addWidget(label, row, column)
        grid.addWidget(field, row, column + 1)

    def _wire(self) -> None:
        self.negative.textChanged.connect(lambda text: self._set(negative_prompt=text))
        self.steps.valueChanged.connect(lambda v: self._set(steps=v))
        self.guidance.valueChanged.connect(lambda v: self._set(guidance=v))
        self.random_seed.toggled.connect(lambda _checked: self._on_seed_edit())
        self.seed.editingFinished.connect(self._on_seed_edit)
        on_click(self.last_seed.clicked, self.use_last_seed)
        self.feather.valueChanged.connect(lambda v: self._set(feather_fraction=v))
        self.padding.valueChanged.connect(lambda v: self._set(padding_fraction=v))
        self.denoising_end.valueChanged.connect(lambda v: self._set(denoising_end=v))
        self.keep_unmasked.toggled.connect(lambda v: self._set(keep_unmasked=v))
        self.preview.toggled.connect(lambda v: self._set(preview=v))

    def _on_seed_edit(self) -> None:
        self.seed.setEnabled(not self.random_seed.isChecked())
        if self.random_seed.isChecked():
            self._set(seed=-1)
        elif self.seed.text():
            self._set(seed=int(self.seed.text()))
        elif self.controller.last_seed is not None:
            self.use_last_seed()
        else:
            self._set(seed=0)

    def use_last_seed(self) -> None:
        if self.controller.last_seed is not None:
            self.random_seed.setChecked(False)
            self.seed.setText(str(self.controller.last_seed))
            self._set(seed=self.controller.last_seed)

    def show_last_seed(self) -> None:
        if self.controller.last_seed is not None:
            self.last_seed.setText(f"last: {self.controller.last_seed}")

    def show_settings(self, s: Settings) -> None:
        with self.showing():
            if self.negative.text() != s.negative_prompt:
                self.negative.setText(s.negative_prompt)
            self.steps.setValue(s.steps)
            self.guidance.setValue(s.guidance)
            self.random_seed.setChecked(s.random_seed)
            self.seed.setEnabled(not s.random_seed)
            if not s.random_seed and s.seed != self._shown_seed:  # a seed being typed stays as typed
                self.seed.setText(str(s.seed))
            self._shown_seed = None if s.random_seed else s.seed
            self.feather.setValue(s.feather_fraction)
            self.padding.setValue(s.padding_fraction)
            self.denoising_end.setValue(s.denoising_end)
            self.keep_unmasked.setChecked(s.keep_unmasked)
            self.preview.setChecked(s.preview)
