"""The docker's Upscale mode, offscreen (no Krita): its widgets are used as a person uses them, against a real
ZeroMQ ROUTER standing in for the service and the fake document side: what is sent, and where the result goes
(a new document, or this document scaled with the result as a layer)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PyQt5.QtWidgets")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))

from plugin_fakes import FakeService
from test_plugin_panel import Docker, big_capture, click, settle

from krita_sdxl.protocol import Image
from krita_sdxl.protocol.geometry import Box, Extent
from krita_sdxl_refiner.adapters.backend import invocation
from krita_sdxl_refiner.core.jobs import JobState

UPSCALE_CAPS = {"methods": ["auto", "lanczos"], "model": None, "tile": 1024, "overlap": 128}


@pytest.fixture
def docker(app, ctx):
    d = Docker(app, ctx, connected=False)
    d.service = FakeService(ctx)
    d.service.caps["upscale"] = UPSCALE_CAPS
    d.adapter.open_error = None  # a Krita window opens new documents
    d.controller.update_settings(endpoint=d.service.endpoint)
    d.pump(lambda: d.controller.client.is_connected)
    settle(app)
    yield d
    d.close()


def choose(combo, value) -> None:
    index = combo.findData(value)
    assert index >= 0 and combo.model().item(index).isEnabled(), value
    combo.setCurrentIndex(index)
    settle()


def answer(d: Docker, size: tuple[int, int] | None = None, value: int = 9):
    """The service accepts the last submit and returns a result (of ``size``: default the one asked for)."""
    d.pump(lambda: bool(d.submits()))
    ident, submit = d.submits()[-1]
    d.service.send(ident, "accepted", job=submit.job, position=0, seed=5, steps=4, denoise_steps=1)
    up = submit["upscale"]
    spec = submit.images["image"].spec
    width, height = size or (up.width, up.height)
    result = Image(type(spec)(width, height, spec.order, spec.depth, spec.sample), bytes([value]) * width * height * 4)
    d.service.send(ident, "result", images={"image": result}, job=submit.job, seed=5, elapsed=0.5)
    d.pump(lambda: d.controller.jobs.get(submit.job).state.finished)
    settle()
    return submit


def test_upscale_a_selection_into_a_new_document(docker):
    d = docker
    choose(d.panel.mode, "upscale")
    assert d.panel.refine_button.text() == "Run" and d.panel.upscale.isVisible()
    assert d.panel.strength.value() == 30 and d.panel.strength.minimum() == 0  # its own strength, 0 allowed
    click(d.panel.refine_button)
    submit = answer(d)
    up = submit["upscale"]
    assert (up.width, up.height, up.method) == (120, 80, "auto")  # the 60x40 selection, 2x
    assert submit["mode"] == "refine" and submit["strength"] == pytest.approx(0.3)
    assert "mask" not in submit.images and submit["work_width"] is None  # the region, whole, no mask
    assert (submit.images["image"].spec.width, submit.images["image"].spec.height) == (60, 40)
    assert d.adapter.opened_boxes == [Box(0, 0, 120, 80)] and not d.adapter.applied and not d.adapter.scaled
    assert any(m.startswith("Opened “#") and " · Upscale · " in m and "2x (120x80)" in m for m in d.messages()), (
        d.messages()
    )
    d.no_internal_error()


def test_scale_this_document_scales_it_and_adds_the_result_as_a_layer(docker):
    d = docker
    d.adapter.selection = None  # the whole layer: 300x200
    choose(d.panel.mode, "upscale")
    choose(d.panel.upscale.factor, "1.5")
    choose(d.panel.upscale.place, "scale")
    d.panel.strength.setValue(0)  # the enlargement alone
    assert d.controller.settings.upscale_strength == 0.0 and d.controller.settings.strength == 0.5
    click(d.panel.refine_button)
    submit = answer(d)
    assert (submit["upscale"].width, submit["upscale"].height) == (450, 300) and submit["strength"] == 0.0
    assert d.adapter.scaled == [(Extent(300, 200), Extent(450, 300))]
    assert [(box, " · Upscale" in name) for box, _data, name in d.adapter.applied] == [(Box(0, 0, 450, 300), True)]
    choose(d.panel.mode, "refine")  # back: the refine's own strength, never 0
    assert d.panel.strength.minimum() == 1 and d.panel.strength.value() == 50


def test_a_target_size_is_fitted_keeping_the_aspect(docker):
    d = docker
    choose(d.panel.mode, "upscale")
    choose(d.panel.upscale.factor, "size")
    assert d.panel.upscale.width_box.isVisible()
    d.panel.upscale.width_box.setValue(1000)
    d.panel.upscale.width_box.editingFinished.emit()
    d.panel.upscale.height_box.setValue(1000)
    d.panel.upscale.height_box.editingFinished.emit()
    click(d.panel.refine_button)
    d.pump(lambda: bool(d.submits()))
    up = d.submits()[-1][1]["upscale"]
    assert (up.width, up.height) == (1000, 667)  # 60x40 into 1000x1000


def test_mistakes_are_told_and_nothing_is_sent(docker):
    d = docker
    choose(d.panel.mode, "upscale")
    choose(d.panel.upscale.factor, "size")
    d.panel.upscale.width_box.setValue(30)
    d.panel.upscale.width_box.editingFinished.emit()
    click(d.panel.refine_button)
    assert "smaller than the 60x40 pixels" in d.messages()[-1]
    choose(d.panel.upscale.factor, "4")
    d.adapter.selection = Box(0, 0, 300, 200)
    d.adapter.canvas = Extent(5000, 200)
    d.adapter.selection = Box(0, 0, 4200, 200)
    click(d.panel.refine_button)
    assert "over 16384 pixels a side" in d.messages()[-1]
    assert not d.submits()
    assert not d.panel.upscale.method.model().item(d.panel.upscale.method.findData("model")).isEnabled()


def test_a_large_region_is_read_off_the_ui_thread_and_a_transparent_one_is_refused(docker):
    """As Refine does: a 3000x2000 layer (24 MB) is read on another thread, Run returns at once with the job
    "Reading the pixels…"; a fully transparent one is refused with the reason once read."""
    d = docker
    d.adapter.selection = None
    choose(d.panel.mode, "upscale")
    choose(d.panel.upscale.factor, "1.5")
    threads: list[int] = []
    gate = threading.Event()
    big_capture(d, 3000, 2000, 255, threads, gate)
    click(d.panel.refine_button)
    (job,) = d.controller.jobs
    assert job.state is JobState.reading and not d.submits()
    gate.set()
    submit = answer(d)
    assert threads and threads[0] != threading.get_ident()
    assert len(bytes(submit.images["image"].data)) == 3000 * 2000 * 4
    assert (submit["upscale"].width, submit["upscale"].height) == (4500, 3000)
    big_capture(d, 3000, 2000, 0, threads)
    click(d.panel.refine_button)
    d.pump(lambda: d.messages()[-1].startswith("Nothing to upscale"))
    assert "is fully transparent there" in d.messages()[-1] and len(d.submits()) == 1
    d.no_internal_error()


def test_a_result_of_the_wrong_size_is_refused(docker):
    d = docker
    choose(d.panel.mode, "upscale")
    click(d.panel.refine_button)
    answer(d, size=(60, 40))
    (job,) = d.controller.jobs
    assert job.state is JobState.failed and "expected" in job.message
    assert not d.adapter.opened


def test_a_backend_that_cannot_upscale(app, ctx):
    d = Docker(app, ctx, connected=True)  # its capabilities have no "upscale"
    try:
        index = d.panel.mode.findData("upscale")
        item = d.panel.mode.model().item(index)
        assert not item.isEnabled() and "cannot upscale" in item.toolTip()
        d.controller.update_settings(mode="upscale")
        click(d.panel.refine_button)
        assert "does not support the 'upscale' mode" in d.messages()[-1] and not d.submits()
    finally:
        d.close()


def test_the_local_backend_starts_with_the_upscaler_file(docker, tmp_path):
    d = docker
    started = []
    d.controller.backend.start = lambda *args: started.append(args)  # what Start would run
    model = tmp_path / "my models" / "x4.pth"
    d.controller.update_settings(upscaler_file=str(model), backend_command="/venv/bin/python")
    d.controller.start_backend()
    command, args, endpoint, extra = started[-1]
    assert extra == ["--upscaler", str(model)]
    program, argv = invocation(command, args, endpoint, extra)
    assert program == "/venv/bin/python" and argv[-2:] == ["--upscaler", str(model)]  # one argument, spaces kept
    assert argv[:4] == ["-m", "krita_sdxl.backend.cli", "serve", "--endpoint"]


def test_the_upscaler_file_is_saved_by_ok_and_dropped_by_cancel(docker, tmp_path):
    """The upscaler file is a field of the connection settings like the others: typed, then Cancel keeps what
    was saved; typed, then OK saves it."""
    d = docker
    d.panel.open_settings()
    dialog = d.panel.dialog
    field = dialog.upscaler.file
    assert field.text() == ""
    field.setText(str(tmp_path / "typo.pth"))
    field.editingFinished.emit()
    click(dialog.cancel_button)
    assert d.controller.settings.upscaler_file == ""
    d.panel.open_settings()
    assert field.text() == ""  # what Cancel dropped is gone when the dialog opens again
    (tmp_path / "x4.pth").write_bytes(b"weights")
    field.setText(str(tmp_path / "x4.pth"))
    d.controller.update_settings(backend_args="--steps 4")  # another setting saved meanwhile: the typing stays
    assert field.text() == str(tmp_path / "x4.pth")
    click(dialog.ok_button)
    assert d.controller.settings.upscaler_file == str(tmp_path / "x4.pth") and not dialog.isVisible()


def test_an_upscaler_file_that_cannot_be_one_is_named_and_not_saved(docker, tmp_path):
    """The dialog checks the file as the backend would load it (one rule, setup/plan/upscalers.py): a missing
    file, a folder or another kind of file disables OK with the reason; the backend never starts to fail on it."""
    d = docker
    d.panel.open_settings()
    dialog = d.panel.dialog
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "x4.safetensors").write_bytes(b"weights")
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)  # exists, yet no file to load (reading it would wait forever)
    for typed, reason in (
        (tmp_path / "missing.pth", "no such file"),
        (tmp_path, "is a folder, not a model file"),
        (tmp_path / "notes.txt", "expected a .pth or .safetensors"),
        (fifo, "not a regular file"),
    ):
        dialog.upscaler.file.setText(f"  {typed}  ")  # pasted with spaces around
        shown = dialog.problem.text()
        assert shown.startswith(f"Upscaler file: {typed}") and reason in shown and "empty for Lanczos" in shown
        assert dialog.problem.isVisible() and not dialog.ok_button.isEnabled() and not dialog.apply_button.isEnabled()
        click(dialog.ok_button)  # disabled: nothing saved, the dialog stays
        assert dialog.isVisible() and d.controller.settings.upscaler_file == ""
    dialog.upscaler.file.setText(str(tmp_path / "x4.safetensors"))
    assert dialog.ok_button.isEnabled() and not dialog.problem.isVisible()
    dialog.upscaler.file.setText("")  # empty: Lanczos
    assert dialog.ok_button.isEnabled()
