"""The Upscale mode's row in the docker: the factor (1.5x to 4x, or a size the result fits in), where the
result goes (a new document, or this document scaled with the result as a layer) and how the picture is
enlarged before it is refined. Shown only in the Upscale mode; edits go to the controller."""

from __future__ import annotations

from PyQt5.QtWidgets import QComboBox, QGridLayout, QLabel, QSpinBox, QWidget

from krita_sdxl.protocol.images import MAX_SIDE

from ..core.settings import Settings
from ..core.upscale import FACTORS, SIZE, UPSCALE
from ..workflow.controller import Controller
from .settings_view import SettingsView

PLACES = (("New document", "new"), ("Scale this document", "scale"))
METHODS = (("Auto", "auto"), ("Lanczos", "lanczos"), ("Model", "model"))

TIPS = {
    "factor": "How much larger the result is. Size: the result fits in the width and height below, keeping the "
    "aspect. With a selection, only the selected area is upscaled",
    "place": "New document: the result opens as a new document; yours is not changed.\nScale this document: "
    "the image is scaled by the same factor (Lanczos) and the refined result is added as a layer above the "
    "source. A selection always opens as a new document",
    "method": "How the picture is enlarged before it is refined: Lanczos, or the backend's upscaler model "
    "(Real-ESRGAN, SwinIR, ...: set in ⚙). Auto: the model when the backend has one",
    "strength": "How much the refiner redraws the enlarged picture: 0.3 adds detail, 0 gives the enlargement alone",
}


class UpscaleOptions(SettingsView):
    def __init__(self, controller: Controller, parent: QWidget | None = None) -> None:
        super().__init__(controller, parent)
        self.factor = QComboBox()
        for value in FACTORS:
            self.factor.addItem(f"{value}×", value)
        self.factor.addItem("Size…", SIZE)
        self.factor.setToolTip(TIPS["factor"])
        self.width_box, self.height_box = QSpinBox(), QSpinBox()
        for box, tip in ((self.width_box, "width"), (self.height_box, "height")):
            box.setRange(8, MAX_SIDE)
            box.setSuffix(" px")
            box.setToolTip(f"The result's largest {tip}")
        self.times = QLabel("×")
        self.place = QComboBox()
        for text, value in PLACES:
            self.place.addItem(text, value)
        self.place.setToolTip(TIPS["place"])
        self.method = QComboBox()
        for text, value in METHODS:
            self.method.addItem(text, value)
        self.method.setToolTip(TIPS["method"])
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setHorizontalSpacing(4)
        grid.addWidget(self.factor, 0, 0)
        grid.addWidget(self.place, 0, 1, 1, 3)
        grid.addWidget(self.width_box, 1, 0)
        grid.addWidget(self.times, 1, 1)
        grid.addWidget(self.height_box, 1, 2)
        grid.addWidget(self.method, 1, 3)
        grid.setColumnStretch(3, 1)
        self.factor.currentIndexChanged.connect(lambda _i: self._set(upscale_factor=self.factor.currentData()))
        self.place.currentIndexChanged.connect(lambda _i: self._set(upscale_place=self.place.currentData()))
        self.method.currentIndexChanged.connect(lambda _i: self._set(upscale_method=self.method.currentData()))
        self.width_box.editingFinished.connect(lambda: self._set(upscale_width=self.width_box.value()))
        self.height_box.editingFinished.connect(lambda: self._set(upscale_height=self.height_box.value()))

    def show_settings(self, s: Settings) -> None:
        with self.showing():
            for combo, value in ((self.factor, s.upscale_factor), (self.place, s.upscale_place),
                                 (self.method, s.upscale_method)):  # fmt: skip
                index = combo.findData(value)
                if index >= 0:
                    combo.setCurrentIndex(index)
            self.width_box.setValue(s.upscale_width)
            self.height_box.setValue(s.upscale_height)
        sized = s.upscale_factor == SIZE
        for widget in (self.width_box, self.times, self.height_box):
            widget.setVisible(sized)
        self.setVisible(s.mode == UPSCALE)

    def show_capabilities(self, caps: dict) -> None:
        """The Model choice only where the backend has an upscaler model."""
        offered = caps.get("upscale") if isinstance(caps.get("upscale"), dict) else {}
        model = offered.get("model") if isinstance(offered, dict) else None
        item = self.method.model().item(self.method.findData("model"))
        item.setEnabled(model is not None)
        name = model.get("name") if isinstance(model, dict) else None
        item.setToolTip(f"{name} on the backend" if name else "The backend has no upscaler model (set one in ⚙)")


def strength_range(mode: str) -> tuple[int, int]:
    """The Strength slider's range in hundredths: an upscale may be 0 (the enlargement alone)."""
    return (0 if mode == UPSCALE else 1), 100
