"""The docker as a person uses it, offscreen (no Krita): every button is clicked with the mouse
(``QTest.mouseClick``) and the prompt is typed into, against a real ZeroMQ ROUTER standing in for
the service where a test needs one. Also the local backend process behind Start/Stop."""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PyQt5.QtWidgets")
zmq = pytest.importorskip("zmq")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))

from plugin_fakes import FakeAdapter, FakeService, make_controller, pump  # noqa: E402
from PyQt5.QtCore import QEventLoop, Qt  # noqa: E402
from PyQt5.QtGui import QImage  # noqa: E402
from PyQt5.QtTest import QTest  # noqa: E402
from PyQt5.QtWidgets import QApplication, QLabel, QWidget  # noqa: E402

from krita_sdxl.protocol import Image, ImageSpec  # noqa: E402
from krita_sdxl.protocol.geometry import Box, Extent  # noqa: E402
from krita_sdxl_refiner.adapters.backend import Backend  # noqa: E402
from krita_sdxl_refiner.core.jobs import JobState, Target  # noqa: E402
from krita_sdxl_refiner.ui.panel import MessagePanel, RefinerPanel  # noqa: E402


def settle(app: QApplication | None = None, seconds: float = 0.05) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents(QEventLoop.AllEvents, 10)


def click(widget: QWidget) -> None:
    """A real mouse click in the middle of the widget (it must be visible and enabled to react)."""
    settle(seconds=0.02)  # new rows are shown by a queued event
    assert widget.isVisible(), f"{widget.text() if hasattr(widget, 'text') else widget} is not visible"
    QTest.mouseClick(widget, Qt.LeftButton)
    settle(seconds=0.02)


class Docker:
    """A panel on screen (offscreen platform) with its controller, adapter and optional service."""

    def __init__(self, app, ctx, connected: bool) -> None:
        self.app = app
        self.service = FakeService(ctx) if connected else None
        endpoint = self.service.endpoint if self.service else "tcp://127.0.0.1:9"  # nothing listens on 9
        self.adapter = FakeAdapter()
        self.controller = make_controller(ctx, endpoint, self.adapter)
        self.panel = RefinerPanel(self.controller)
        self.panel.resize(340, 900)
        self.panel.show()
        self.controller.start()
        if self.service:
            self.pump(lambda: self.controller.client.is_connected)
        settle(app)

    def pump(self, until, timeout: float = 5.0) -> None:
        pump(self.app, until, [self.service] if self.service else [], timeout)

    def submits(self):
        return self.service.of_type("submit") if self.service else []

    def messages(self) -> list[str]:
        return [text for _level, text in self.panel.messages.entries]

    def no_internal_error(self) -> None:
        assert not [m for m in self.messages() if "Internal error" in m], self.messages()

    def close(self) -> None:
        self.panel.hide()
        self.panel.deleteLater()
        self.controller.shutdown()
        if self.service:
            self.service.close()


@pytest.fixture
def offline(app, ctx):
    docker = Docker(app, ctx, connected=False)
    yield docker
    docker.close()


@pytest.fixture
def online(app, ctx):
    docker = Docker(app, ctx, connected=True)
    yield docker
    docker.close()


def finish_job(d: Docker, index: int = -1, seed: int = 1234, value: int = 9):
    """Let the service answer the ``index``-th submit with accepted and a result of ``value`` bytes."""
    d.pump(lambda: len(d.submits()) > (index if index >= 0 else 0))  # its pixels are in (a round trip for credit)
    ident, submit = d.submits()[index]
    d.service.send(ident, "accepted", job=submit.job, position=0, seed=seed, steps=30, denoise_steps=15)
    spec = submit.images["image"].spec
    d.service.send(ident, "result", images={"image": Image(spec, bytes([value]) * spec.byte_length)}, job=submit.job,
                   seed=seed, elapsed=0.5)  # fmt: skip
    d.pump(lambda: d.controller.history.get(submit.job) is not None)
    settle(d.app)
    return submit


# --- the buttons ---------------------------------------------------------------------------------


def test_a_large_layers_upload_shows_its_progress_in_the_docker(online):
    """Issue 20, item 2: the pixels go up in chunks under the service's credit; the docker's bar shows
    how much of them the service holds while they go (a large layer over a slow link takes a while)."""
    d = online
    d.adapter.selection = None
    d.adapter.canvas, d.adapter.bounds = Extent(2048, 1024), Box(0, 0, 2048, 1024)  # 8 MiB of BGRA pixels
    d.service.uploads.window = 2 * 1024 * 1024
    d.service.uploads.hold = True  # the link stalls after the first credit: the bar stands still
    click(d.panel.refine_button)
    d.pump(lambda: "Uploading" in d.panel.progress.format())
    assert d.panel.progress.format() == "Uploading 0% of 8 MiB…" and d.panel.progress.maximum() == 100
    for ident, frames in d.service.uploads.release():  # the link goes on: 2 MiB at a time
        d.service.router.send_multipart([ident, *frames])
    d.pump(lambda: 0 < d.panel.progress.value() < 100)
    assert d.panel.progress.format().startswith("Uploading ") and d.panel.progress.maximum() == 100
    submit = finish_job(d)
    assert submit.images["image"].spec.byte_length == 2048 * 1024 * 4
    assert d.panel.progress.format().startswith("Done")


def test_refine_button_captures_and_queues_a_job(offline):
    d = offline
    click(d.panel.refine_button)
    d.no_internal_error()
    assert d.adapter.captures == 1
    (job,) = d.controller.jobs
    assert job.state is JobState.waiting
    assert "not connected" in d.messages()[-1]
    row = d.panel.history.job_rows[job.id]
    assert row.isVisible() and "Waiting" in row.detail.text()
    assert "Waiting" in d.panel.progress.format()


def test_cancel_button_cancels_every_waiting_job(offline):
    d = offline
    click(d.panel.refine_button)
    click(d.panel.refine_button)
    assert len(d.controller.jobs.unfinished()) == 2 and d.panel.cancel_button.isEnabled()
    click(d.panel.cancel_button)
    d.no_internal_error()
    assert not d.controller.jobs.unfinished()
    assert all(j.state is JobState.cancelled for j in d.controller.jobs)
    assert not d.panel.history.job_rows and not d.panel.cancel_button.isEnabled()


def test_each_queued_job_has_its_own_cancel(offline):
    d = offline
    click(d.panel.refine_button)
    click(d.panel.refine_button)
    first, second = d.controller.jobs
    click(d.panel.history.job_rows[first.id].cancel_button)
    d.no_internal_error()
    assert first.state is JobState.cancelled and second.state is JobState.waiting
    assert list(d.panel.history.job_rows) == [second.id]


def test_cancel_of_a_sent_job_asks_the_service(online):
    d = online
    click(d.panel.refine_button)
    d.pump(lambda: bool(d.submits()))
    (job,) = d.controller.jobs
    click(d.panel.history.job_rows[job.id].cancel_button)
    d.pump(lambda: bool(d.service.of_type("cancel")))
    assert d.service.of_type("cancel")[0][1]["job"] == job.id
    ident, _ = d.service.of_type("cancel")[0]
    d.service.send(ident, "progress", job=job.id, step=3, total=15)
    d.service.send(ident, "cancelled", job=job.id, reason="cancelled")  # the service confirms
    d.pump(lambda: job.state is JobState.cancelled)
    settle(d.app)
    assert d.messages()[-1] == f"Cancelled: “#1 · seed {job.seed} · a red barn” at step 3/15."
    assert job.id not in d.panel.history.job_rows


def test_cancelling_a_queued_job_from_its_row_leaves_a_line_in_the_log(offline):
    d = offline
    click(d.panel.refine_button)
    click(d.panel.refine_button)
    first, second = d.controller.jobs
    click(d.panel.history.job_rows[second.id].cancel_button)
    assert d.messages()[-1] == f"Cancelled: “#2 · seed {second.seed} · a red barn” before it was sent."
    click(d.panel.cancel_button)  # the rest: one line each
    assert d.messages()[-1] == f"Cancelled: “#1 · seed {first.seed} · a red barn” before it was sent."
    assert not d.panel.history.job_rows


def test_typing_the_prompt_and_ctrl_enter(online):
    d = online
    d.panel.prompt.clear()
    QTest.keyClicks(d.panel.prompt, "a castle at dawn")
    assert d.controller.settings.prompt == "a castle at dawn"
    assert d.adapter.written["prompt"] == "a castle at dawn"
    QTest.keyClick(d.panel.prompt, Qt.Key_Return, Qt.ControlModifier)
    d.pump(lambda: bool(d.submits()))
    assert d.submits()[0][1]["prompt"] == "a castle at dawn"
    assert d.panel.prompt.toPlainText() == "a castle at dawn"  # Ctrl+Enter ran the job, added no line


def test_generate_mode_and_advanced_settings_reach_the_service(app, ctx):
    d = Docker(app, ctx, connected=False)
    d.service = FakeService(ctx)
    d.service.caps["modes"] = ["refine", "generate", "two_stage"]
    try:
        d.controller.update_settings(endpoint=d.service.endpoint)
        d.pump(lambda: d.controller.client.is_connected)
        settle(app)
        d.panel.mode.setCurrentIndex(d.panel.mode.findData("generate"))
        assert d.panel.refine_button.text() == "Run"
        click(d.panel.advanced_section.button)
        adv = d.panel.advanced
        assert adv.denoising_end.isVisible() and adv.denoising_end.width() >= 60  # never squeezed to 17 px
        adv.denoising_end.setValue(0.7)
        click(adv.keep_unmasked)  # was on
        adv.steps.setValue(12)
        click(d.panel.refine_button)
        d.pump(lambda: bool(d.submits()))
        submit = d.submits()[0][1]
        assert submit["mode"] == "generate" and submit["denoising_end"] == pytest.approx(0.7)
        assert submit["keep_unmasked"] is False and submit["steps"] == 12 and "mask" in submit.images
    finally:
        d.close()


def test_resubmit_button_runs_a_job_the_backend_dropped_as_it_was(online):
    d = online
    click(d.panel.refine_button)
    d.pump(lambda: bool(d.submits()))
    ident, first = d.submits()[0]
    d.service.send(ident, "cancelled", job=first.job, reason="shutdown")  # the service was stopped
    d.pump(lambda: d.panel.resubmit_button.isVisible())
    (job,) = d.controller.jobs
    assert job.state is JobState.lost and "Drop" == d.panel.history.job_rows[job.id].cancel_button.text()
    click(d.panel.resubmit_button)
    d.no_internal_error()
    d.pump(lambda: len(d.submits()) == 2)
    again = d.submits()[1][1]
    assert again.job != first.job and bytes(again.images["image"].data) == bytes(first.images["image"].data)
    settle(d.app)
    assert not d.panel.resubmit_button.isVisible()


def test_result_row_apply_open_discard(online):
    d = online
    d.adapter.placed_active = False
    click(d.panel.refine_button)
    submit = finish_job(d, seed=4242)
    assert d.messages()[-1] == "Added layer “#1 · seed 4242 · a red barn” to barn.kra (not the document shown now)."
    row = d.panel.history.result_rows[submit.job]
    assert row.isVisible() and "seed 4242" in row.detail.text() and "strength 0.50" in row.detail.text()
    assert row.thumb.pixmap() is not None and not row.thumb.pixmap().isNull()
    click(row.apply_button)
    assert d.adapter.to_active == ["#1 · seed 4242 · a red barn"]
    assert d.messages()[-1] == "Added layer “#1 · seed 4242 · a red barn” to other.kra."
    click(row.open_button)  # the fake refuses first: the message says why, the result stays
    assert d.messages()[-1] == "no window" and submit.job in d.panel.history.result_rows
    d.adapter.open_error = None
    click(row.open_button)
    assert d.adapter.opened == ["#1 · seed 4242 · a red barn"] and "Untitled 2" in d.messages()[-1]
    click(row.discard_button)
    settle(d.app)
    d.no_internal_error()
    assert submit.job not in d.panel.history.result_rows and len(d.controller.history) == 0
    assert d.panel.history.empty.isVisible()


def test_again_reruns_the_captured_pixels_not_the_active_layer(online):
    d = online
    click(d.panel.refine_button)
    first = finish_job(d, seed=11)
    d.adapter.fill = 99  # the active layer is now something else (the result layer, say)
    row = d.panel.history.result_rows[first.job]
    click(row.again_button)
    d.no_internal_error()
    assert d.adapter.captures == 1  # nothing read from the document again
    d.pump(lambda: len(d.submits()) == 2)
    second = d.submits()[1][1]
    assert bytes(second.images["image"].data) == bytes(first.images["image"].data)
    assert bytes(second.images["mask"].data) == bytes(first.images["mask"].data)
    assert second["seed"] not in (None, first["seed"])  # a new seed
    assert second["prompt"] == first["prompt"] and second["strength"] == first["strength"]
    finish_job(d, index=1, seed=12)
    assert d.adapter.targets[-1].above == ("layer-1",)  # stacked above the first result
    rows = d.panel.history.result_rows
    assert len(rows) == 2 and d.panel.history.rows.indexOf(rows[second.job]) < d.panel.history.rows.indexOf(
        rows[first.job]
    )  # newest first


def test_a_result_that_arrives_while_another_is_applied_waits_its_turn(online):
    """Krita's ``Node.addChildNode`` runs Qt's event loop (measured in real Krita: a 0 ms timer fires
    inside it), so the next result can be read while the first is being placed. The client does not
    read inside its own read: the next result is placed after the first is in the history, above it."""
    d = online
    for _ in range(3):
        click(d.panel.refine_button)
    d.pump(lambda: len(d.submits()) == 3)
    submits = d.submits()
    d.adapter.on_apply = lambda: settle(d.app, 0.2)  # the event loop runs while a layer is added
    for (ident, submit), seed in zip(submits, (1, 2, 3), strict=True):
        spec = submit.images["image"].spec
        d.service.send(ident, "accepted", job=submit.job, position=0, seed=seed, steps=30, denoise_steps=15)
        d.service.send(ident, "result", images={"image": Image(spec, bytes([seed]) * spec.byte_length)},
                       job=submit.job, seed=seed, elapsed=0.5)  # fmt: skip
    d.pump(lambda: len(d.controller.history) == 3)
    settle(d.app)
    d.no_internal_error()
    assert [t.above for t in d.adapter.targets] == [(), ("layer-1",), ("layer-2", "layer-1")]
    assert [e.seed for e in d.controller.history.newest_first()] == [3, 2, 1]


def test_three_quick_refines_stack_newest_on_top(online):
    """Run, Run, Run before the first result returns: each result goes above the results of the same
    source that are there when it arrives (the adapter picks the topmost of them), not under them."""
    d = online
    for _ in range(3):
        click(d.panel.refine_button)
    d.pump(lambda: len(d.submits()) == 3)
    for index, seed in enumerate((1, 2, 3)):
        finish_job(d, index=index, seed=seed)
    names = [name for _box, _data, name in d.adapter.applied]
    assert names == ["#1 · seed 1 · a red barn", "#2 · seed 2 · a red barn", "#3 · seed 3 · a red barn"]
    assert [t.above for t in d.adapter.targets] == [(), ("layer-1",), ("layer-2", "layer-1")]
    d.adapter.document = "another document"  # a refine of the same layer id in another document: its own stack
    click(d.panel.refine_button)
    finish_job(d, index=3, seed=4)
    assert d.adapter.targets[-1].above == ()


def test_resubmit_runs_with_the_seed_it_was_captured_with(online):
    """A "Random" seed is drawn when the job is made: a job the backend lost, before or after it said
    which seed it used, runs again with that seed (the README promises "exactly as captured")."""
    d = online
    click(d.panel.refine_button)
    click(d.panel.refine_button)
    d.pump(lambda: len(d.submits()) == 2)
    (ident, first), (_, second) = d.submits()
    assert first["seed"] is not None and second["seed"] is not None and first["seed"] != second["seed"]
    d.service.send(ident, "accepted", job=first.job, position=0, seed=first["seed"], steps=30, denoise_steps=15)
    for submit in (first, second):  # the first was accepted, the second not yet: both lost
        d.service.send(ident, "cancelled", job=submit.job, reason="shutdown")
    d.pump(lambda: len(d.controller.jobs.lost()) == 2)
    settle(d.app)
    click(d.panel.resubmit_button)
    d.pump(lambda: len(d.submits()) == 4)
    again = {m["prompt"] + str(m["seed"]) for _i, m in d.submits()[2:]}
    assert again == {first["prompt"] + str(first["seed"]), second["prompt"] + str(second["seed"])}
    assert [m["seed"] for _i, m in d.submits()[2:]] == [first["seed"], second["seed"]]
    numbers = [j.number for j in d.controller.jobs if j.state is not JobState.cancelled]
    assert numbers == [1, 2]  # the layer names keep their "#1", "#2"


def big_capture(d: Docker, width: int, height: int, alpha: int, read_threads: list, gate=None):
    """Make the fake document a ``width`` x ``height`` layer whose pixels are read later, by a reader that
    notes the thread it runs on (and waits for ``gate``, if given), as Krita's adapter does."""
    from krita_sdxl_refiner.core.document import Capture
    from krita_sdxl_refiner.core.pixelformat import pixel_format

    def capture(source, planner):
        plan = planner(Extent(width, height), Box(0, 0, width, height), None)
        crop = plan.crop

        def read():
            read_threads.append(threading.get_ident())
            if gate is not None:
                gate.wait(10)
            return bytes([9, 9, 9, alpha]) * (crop.width * crop.height), None

        target = Target(d.adapter.document, "big", source, "layer “Big” in big.kra")
        return Capture(plan, pixel_format("RGBA", "U8"), "", "srgb", None, None, target, reader=read)

    d.adapter.capture = capture


def test_a_large_layer_is_read_off_the_ui_thread_and_then_sent(online):
    """A 3000x2000 layer (24 MB): Run returns at once with the job "Reading the pixels…"; the copy runs
    on another thread; then the job is sent with every byte. In Krita the copy is ``projectionPixelData``."""
    d = online
    threads: list[int] = []
    gate = threading.Event()
    big_capture(d, 3000, 2000, 255, threads, gate)
    click(d.panel.refine_button)
    (job,) = d.controller.jobs
    assert job.state is JobState.reading and "Reading the pixels" in d.panel.history.job_rows[job.id].detail.text()
    gate.set()
    d.pump(lambda: bool(d.submits()))
    submit = d.submits()[0][1]
    assert threads and threads[0] != threading.get_ident()
    assert submit.images["image"].spec.width == 3000 and len(bytes(submit.images["image"].data)) == 3000 * 2000 * 4
    assert job.state is JobState.sent


def test_a_large_layer_cancelled_while_read_or_with_nothing_visible_sends_nothing(online):
    d = online
    threads: list[int] = []
    gate = threading.Event()
    big_capture(d, 3000, 2000, 255, threads, gate)
    click(d.panel.refine_button)
    (job,) = d.controller.jobs
    click(d.panel.history.job_rows[job.id].cancel_button)
    gate.set()
    settle(d.app, 0.3)
    assert job.state is JobState.cancelled and not d.submits() and "before it was sent" in d.messages()[-1]
    big_capture(d, 3000, 2000, 0, threads)  # fully transparent: refused once read, with the reason
    click(d.panel.refine_button)
    d.pump(lambda: d.messages()[-1].startswith("Nothing to refine"))
    assert "layer “Big” in big.kra is fully transparent" in d.messages()[-1]
    assert [j.id for j in d.controller.jobs] == [job.id] and not d.panel.history.job_rows and not d.submits()


def test_kept_result_of_a_closed_document_stays_visible(online):
    d = online
    d.adapter.apply_reason = "its document was closed"
    click(d.panel.refine_button)
    submit = finish_job(d)
    d.adapter.apply_reason = None
    d.adapter.document = "another document"  # the artist switched documents
    d.panel.document_changed()
    row = d.panel.history.result_rows[submit.job]  # never-applied results show in every document
    assert "not applied: its document was closed" in row.where.text()
    assert any("kept in the history" in m for m in d.messages())
    d.controller.notice.emit("a later message", "info")
    assert any("kept in the history" in m for m in d.messages())  # not overwritten
    click(row.apply_button)  # into the document shown now: the row stays there
    assert d.adapter.to_active and d.controller.history.get(submit.job).applied
    assert d.panel.history.result_rows[submit.job] is row and row.isVisible()
    assert "seed 1234" in row.detail.text() and row.where.text().endswith("· in other.kra")


def test_results_follow_the_document_shown(online):
    d = online
    click(d.panel.refine_button)
    submit = finish_job(d)
    history = d.panel.history
    history.document_of_view = lambda: "another document"
    d.panel.document_changed()
    assert submit.job not in history.result_rows and "1 in other documents" in history.heading.text()
    click(history.all_documents)
    assert submit.job in history.result_rows
    history.document_of_view = lambda: "doc"
    click(history.all_documents)
    assert submit.job in history.result_rows


def test_last_seed_button_and_live_preview(online):
    d = online
    click(d.panel.refine_button)
    d.pump(lambda: bool(d.submits()))
    ident, submit = d.submits()[0]
    d.service.send(ident, "accepted", job=submit.job, position=0, seed=31337, steps=30, denoise_steps=15)
    preview = Image(ImageSpec(4, 4, "RGBA", 8, "uint"), bytes([0, 255, 0, 255] * 16))
    d.service.send(ident, "progress", images={"preview": preview}, job=submit.job, step=2, total=15)
    d.pump(lambda: d.panel.progress.value() == 2)
    assert d.panel.progress.format() == "Step 2/15" and d.panel.progress.maximum() == 15
    row = d.panel.history.job_rows[submit.job]
    assert row.thumb.pixmap() is not None and not row.thumb.pixmap().isNull()  # the live preview
    click(d.panel.advanced_section.button)
    click(d.panel.advanced.last_seed)
    assert d.controller.settings.seed == 31337 and not d.panel.advanced.random_seed.isChecked()


def type_over(field, text: str) -> None:
    field.setFocus()
    field.selectAll()
    QTest.keyClicks(field, text)


def test_settings_dialog_saves_nothing_before_ok_and_an_invalid_endpoint_blocks_ok(offline):
    """Qt's dialog conventions: a mistyped endpoint disables OK and Apply with the reason shown; Enter
    does nothing then; Cancel forgets what was typed; Enter (OK) with a good endpoint saves and closes."""
    d = offline
    click(d.panel.settings_button)
    dialog = d.panel.dialog
    assert dialog.isVisible() and dialog.ok_button.isEnabled() and dialog.ok_button.isDefault()
    saved = d.controller.settings.endpoint
    type_over(dialog.endpoint, "localhost:5588")
    assert not dialog.ok_button.isEnabled() and not dialog.apply_button.isEnabled()
    assert dialog.problem.isVisible() and "did you mean tcp://localhost:5588" in dialog.problem.text()
    QTest.keyClick(dialog.endpoint, Qt.Key_Return)  # Enter: OK is disabled, nothing happens
    assert dialog.isVisible() and d.controller.settings.endpoint == saved and "endpoint" not in d.adapter.written
    type_over(dialog.server_key, "abc")  # a key of the wrong length: refused too, with its reason
    assert "Server key: 3 characters" in dialog.problem.text()
    click(dialog.cancel_button)
    assert not dialog.isVisible() and d.controller.settings.endpoint == saved and not d.adapter.written
    click(d.panel.settings_button)  # opened again: what Cancel dropped is gone
    assert dialog.endpoint.text() == saved and dialog.server_key.text() == "" and dialog.ok_button.isEnabled()
    type_over(dialog.endpoint, "tcp://127.0.0.1:7")
    QTest.keyClick(dialog.endpoint, Qt.Key_Return)  # Enter is OK: saved, connecting there, closed
    settle(d.app)
    assert not dialog.isVisible() and d.controller.settings.endpoint == "tcp://127.0.0.1:7"
    assert d.adapter.written["endpoint"] == "tcp://127.0.0.1:7" and d.controller.client.endpoint == "tcp://127.0.0.1:7"


def test_settings_dialog_apply_keeps_it_open_and_the_backend_row_describes_the_backend_connected_now(app, ctx):
    first, second = FakeService(ctx), FakeService(ctx)
    first.caps = {**first.caps, "gpu": "First GPU"}
    second.caps = {**second.caps, "gpu": "Second GPU"}
    d = Docker(app, ctx, connected=False)
    d.service = first
    try:
        d.controller.update_settings(endpoint=first.endpoint)
        pump(app, lambda: d.controller.client.is_connected, [first, second])
        click(d.panel.settings_button)
        dialog = d.panel.dialog
        assert "First GPU" in dialog.backend_info.text()
        type_over(dialog.endpoint, "tcp://127.0.0.1:9")  # nothing listens there
        click(dialog.apply_button)
        assert dialog.isVisible() and d.controller.settings.endpoint == "tcp://127.0.0.1:9"
        assert "First GPU" not in dialog.backend_info.text() and "none connected" in dialog.backend_info.text()
        type_over(dialog.endpoint, second.endpoint)
        click(dialog.apply_button)
        pump(app, lambda: "Second GPU" in dialog.backend_info.text(), [first, second])
        assert "First GPU" not in dialog.backend_info.text()
        click(dialog.ok_button)
        assert not dialog.isVisible() and d.controller.settings.endpoint == second.endpoint
    finally:
        d.service = None
        d.close()
        first.close()
        second.close()


def test_a_server_key_entered_in_the_dialog_shows_the_authorize_line_to_paste(offline, tmp_path):
    """OK with a server key: this computer's key pair is made, and the line for the backend machine is in
    the message log and in the dialog, quoted for a shell (Z85 keys hold * ? ( ) & < > # $ !)."""
    import shlex

    from zmq import auth as zmq_auth

    d = offline
    d.controller.app_data = tmp_path  # the key pair goes here, not into the real application data
    server_key = zmq.curve_keypair()[0].decode()
    click(d.panel.settings_button)
    dialog = d.panel.dialog
    assert not dialog.authorize.isVisible()
    type_over(dialog.server_key, server_key)
    click(dialog.ok_button)
    line = d.messages()[-1].split("On the backend machine run: ", 1)[1]
    argv = shlex.split(line)
    public = zmq_auth.load_certificate(d.controller.settings.client_secret_key)[0].decode()
    assert argv == ["krita-sdxl", "authorize", public, "--dir", "AUTHORIZED_KEYS_FOLDER"]
    click(d.panel.settings_button)
    assert (
        dialog.authorize.isVisible()
        and shlex.quote(public).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        in dialog.authorize.text()
    )
    assert dialog.client_key.text() == d.controller.settings.client_secret_key


def test_a_bad_endpoint_in_kritarc_is_shown_in_the_connection_line(app, ctx):
    """Settings written by hand (or by an older version) can still be unusable: the line says so."""
    d = Docker(app, ctx, connected=False)
    try:
        d.controller.update_settings(endpoint="localhost:5588")
        assert d.controller.client.state.value == "invalid"
        assert "did you mean tcp://localhost:5588" in d.panel.connection.toolTip()
        assert "invalid" in d.panel.connection.text()
        click(d.panel.refine_button)
        assert "The endpoint cannot be used (endpoint 'localhost:5588' has no scheme" in d.messages()[-1]
    finally:
        d.close()


# --- the local backend ---------------------------------------------------------------------------

posix_only = pytest.mark.skipif(os.name != "posix", reason="uses a shell script as the backend command")


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-krita-sdxl"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@posix_only
def test_typed_backend_command_is_saved_by_ok_and_started(offline, tmp_path):
    """Type the command, the arguments and the endpoint, Enter (OK): ▶ Start runs what was typed."""
    d = offline
    command = script(tmp_path, 'echo "ready on $3"\nexec sleep 30\n')
    click(d.panel.settings_button)
    dialog = d.panel.dialog
    for field, text in ((dialog.backend_command, command), (dialog.backend_args, "serve --demo")):
        type_over(field, text)
    assert d.controller.settings.backend_command != command  # typed, not saved
    type_over(dialog.endpoint, "tcp://127.0.0.1:7")
    QTest.keyClick(dialog.endpoint, Qt.Key_Return)
    settle(d.app)
    assert not dialog.isVisible() and d.controller.settings.endpoint == "tcp://127.0.0.1:7"
    assert d.controller.settings.backend_command == command and d.controller.settings.backend_args == "serve --demo"
    click(d.panel.backend_button)
    d.pump(lambda: d.controller.backend.state.value == "running")
    assert "serve --demo --endpoint tcp://127.0.0.1:7" in d.controller.backend.log_tail()
    click(d.panel.backend_button)
    d.pump(lambda: d.controller.backend.state.value == "stopped")


@posix_only
def test_start_and_stop_backend_buttons(offline, tmp_path):
    d = offline
    command = script(tmp_path, 'echo "loading"\necho "ready on $3"\nexec sleep 30\n')
    d.controller.update_settings(backend_command=command, backend_args="serve")
    settle(d.app)
    assert d.panel.backend_button.text() == "▶ Start" and "Start the local backend" in d.panel.backend_button.toolTip()
    click(d.panel.backend_button)
    d.pump(lambda: d.controller.backend.state.value == "running")
    d.no_internal_error()
    assert d.panel.backend_button.text() == "■ Stop"
    assert "ready on tcp://127.0.0.1:9" in d.controller.backend.log_tail()
    click(d.panel.backend_button)
    d.pump(lambda: d.controller.backend.state.value == "stopped")
    assert d.panel.backend_button.text() == "▶ Start"
    assert "the local backend stopped" in d.controller.client.detail  # shown now, not after a timeout
    # the same from the settings dialog
    click(d.panel.settings_button)
    dialog = d.panel.dialog
    click(dialog.backend_start)
    d.pump(lambda: d.controller.backend.state.value == "running")
    assert "ready on" in dialog.backend_log.toPlainText() and not dialog.backend_start.isEnabled()
    click(dialog.backend_stop)
    d.pump(lambda: d.controller.backend.state.value == "stopped")
    d.no_internal_error()
    dialog.close()


@posix_only
def test_backend_failure_keeps_the_log(app, tmp_path):
    backend = Backend()
    cmd = script(tmp_path, 'echo "Traceback: no CUDA device"\nexit 3\n')
    backend.start(cmd, "serve --demo", "tcp://127.0.0.1:5588")
    pump(app, lambda: backend.state.value == "failed", [])
    assert "code 3" in backend.detail and "no CUDA device" in backend.log_tail()


def test_backend_missing_command(app, tmp_path):
    backend = Backend()
    backend.start(str(tmp_path / "does-not-exist"), "serve", "tcp://127.0.0.1:5588")
    pump(app, lambda: backend.state.value == "failed", [])
    assert "could not start" in backend.detail


# --- layout --------------------------------------------------------------------------------------


def test_the_panel_reads_top_down_and_stays_small(offline):
    panel = offline.panel
    order = [
        panel.prompt,
        panel.strength,
        panel.refine_button,
        panel.progress,
        panel.advanced_section,
        panel.messages,
        panel.history,
        panel.connection,
    ]
    tops = [w.mapTo(panel, w.rect().topLeft()).y() for w in order]
    assert tops == sorted(tops), tops
    assert not panel.advanced.isVisible() and not panel.dialog.isVisible()  # folded away
    for widget in (panel.mode, panel.source, panel.strength, *_advanced_fields(panel)):
        assert widget.toolTip(), widget
    height = panel.minimumSizeHint().height()
    print(f"docker panel minimum height: {height} px (width {panel.minimumSizeHint().width()} px)")
    assert height <= 300


def test_the_docker_scrolls_up_and_down_never_sideways(offline):
    """In a short, narrow docker (Krita's default width) everything can be reached by scrolling down,
    the content is never wider than the docker, and the parts used less stay folded."""
    panel = offline.panel
    scroll = panel.scroll
    assert scroll.horizontalScrollBarPolicy() == Qt.ScrollBarAlwaysOff
    panel.resize(262, 200)
    settle(offline.app)
    assert not panel.advanced.isVisible()
    click(panel.advanced_section.button)  # unfolded, the content is taller still
    settle(offline.app)
    content = scroll.widget()
    assert scroll.verticalScrollBar().isVisible() and scroll.verticalScrollBar().maximum() > 0
    assert content.width() <= scroll.viewport().width(), (content.width(), scroll.viewport().width())
    assert panel.advanced.denoising_end.width() >= 60 and panel.refine_button.width() >= 40
    scroll.ensureWidgetVisible(panel.connection)  # the bottom line is reachable
    settle(offline.app)
    top = panel.connection.mapTo(scroll.viewport(), panel.connection.rect().topLeft()).y()
    assert 0 <= top and top + panel.connection.height() <= scroll.viewport().height()


def _advanced_fields(panel):
    a = panel.advanced
    return (a.negative, a.steps, a.guidance, a.seed, a.random_seed, a.feather, a.padding, a.denoising_end,
            a.keep_unmasked, a.preview)  # fmt: skip


def test_the_run_button_never_repeats_the_mode(offline):
    d = offline
    for index in range(d.panel.mode.count()):
        d.panel.mode.setCurrentIndex(index)
        assert d.panel.refine_button.text() == "Run" != d.panel.mode.currentText()


def test_the_connection_line_is_cut_with_an_ellipsis_and_the_tooltip_has_it_all(offline):
    d = offline
    d.panel.resize(262, 700)
    settle(d.app)
    reason = "no answer from tcp://192.168.100.200:5588 (are the CURVE keys right?); retrying"
    d.controller.client.state_changed.emit("disconnected", reason)
    settle(d.app)
    line = d.panel.connection
    assert line.text().endswith("…") and "disconnected — " in line.text()
    assert line.fontMetrics().horizontalAdvance(line.shown) < line.width()
    assert reason in line.toolTip()
    d.panel.resize(1200, 700)  # wide enough: the whole reason, no ellipsis
    settle(d.app)
    assert line.shown == f"disconnected — {reason}"


def test_result_names_start_with_what_tells_them_apart(online):
    d = online
    click(d.panel.refine_button)
    submit = finish_job(d, seed=4242)
    row = d.panel.history.result_rows[submit.job]
    assert d.adapter.applied[-1][2] == "#1 · seed 4242 · a red barn"
    assert row.title.text() == "#1 · a red barn"


def test_message_panel(app):
    widget = MessagePanel("no pyzmq for Python 3.13")
    texts = [label.text() for label in widget.findChildren(QLabel)]
    assert texts == ["no pyzmq for Python 3.13"]


def test_preview_image_from_frames(app):
    from krita_sdxl_refiner.adapters.buffers import preview_image

    image = preview_image(ImageSpec(2, 1, "RGBA", 8, "uint"), bytes([255, 0, 0, 255, 0, 0, 255, 255]))
    assert isinstance(image, QImage) and image.pixelColor(0, 0).red() == 255 and image.pixelColor(1, 0).blue() == 255
