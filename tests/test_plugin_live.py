"""Issue 22, live refine in the docker, offscreen (no Krita): the Live row clicked with the mouse, the workflow
against a real ZeroMQ ROUTER standing in for the service, and a fake live document (``FakeLive``: the preview
layer, the source's pixels, a pen that can be down). Real Krita runs the same in tests/test_krita_live.py."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PyQt5.QtWidgets")
zmq = pytest.importorskip("zmq")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))

from plugin_fakes import FakeAdapter, FakeService, pump  # noqa: E402
from PyQt5.QtCore import QEventLoop, Qt  # noqa: E402
from PyQt5.QtTest import QTest  # noqa: E402
from PyQt5.QtWidgets import QApplication  # noqa: E402

from krita_sdxl.protocol import Image  # noqa: E402
from krita_sdxl.protocol.geometry import Box, Extent  # noqa: E402
from krita_sdxl.protocol.policy import capped_steps  # noqa: E402
from krita_sdxl_refiner.adapters.client import Client  # noqa: E402
from krita_sdxl_refiner.compose import build_controller  # noqa: E402
from krita_sdxl_refiner.core.document import Capture, Placed  # noqa: E402
from krita_sdxl_refiner.core.jobs import Target  # noqa: E402
from krita_sdxl_refiner.core.live_plan import live_work  # noqa: E402
from krita_sdxl_refiner.core.live_port import LiveBusy, LiveGone  # noqa: E402
from krita_sdxl_refiner.core.live_watch import BAND_PIXELS, Shape, Stillness, Watch, bands, watched_box  # noqa: E402
from krita_sdxl_refiner.core.pixelformat import pixel_format  # noqa: E402
from krita_sdxl_refiner.ui.panel import RefinerPanel  # noqa: E402

FMT = pixel_format("RGBA", "U8")


class FakeLive:
    """The live document port over a painting that is one fill value (``paint()`` changes it)."""

    def __init__(self) -> None:
        self.canvas = Extent(300, 200)
        self.selection: Box | None = None
        self.fill = 40
        self.busy = False  # the pen is down
        self.gone: str | None = None
        self.sessions = 0
        self.preview: tuple[Box, bytes] | None = None  # what the preview layer holds
        self.previews = 0  # "Live preview" layers that exist
        self.shown: list[bytes] = []
        self.applied: list[tuple[str, Box, bytes]] = []
        self.captures = 0
        self.reads = 0

    def paint(self) -> None:
        self.fill = (self.fill + 17) % 250 + 1

    def start(self, source: str) -> str:
        self.sessions += 1
        self.previews += 1
        return f"session-{self.sessions}"

    def shape(self, session: Any) -> Shape:
        if self.gone:
            raise LiveGone(self.gone)
        return Shape(self.canvas, self.selection)

    def read(self, session: Any, box: Box) -> bytes:
        self.reads += 1
        return bytes([self.fill]) * (box.width * box.height)

    def capture(self, session: Any, planner: Any) -> Capture:
        if self.busy:
            raise LiveBusy("pen down")
        self.captures += 1
        plan = planner(self.canvas, Box(0, 0, *self.canvas), self.selection)
        crop = plan.crop
        pixels = bytes([self.fill]) * (crop.width * crop.height * 4)
        mask = bytes([255]) * (crop.width * crop.height) if plan.masked else None
        return Capture(plan, FMT, "sRGB", "srgb", pixels, mask, Target("doc", "node", "layer", "layer “Paint”"))

    def show(self, session: Any, box: Box, fmt: Any, data: Any) -> None:
        if self.busy:
            raise LiveBusy("pen down")
        if self.gone:
            raise LiveGone(self.gone)
        self.preview = (box, bytes(data))
        self.shown.append(bytes(data))

    def apply(self, session: Any, name: str, box: Box, data: Any) -> Placed:
        self.applied.append((name, box, bytes(data)))
        return Placed(f"applied-{len(self.applied)}", "paint.kra", True, "doc")

    def notify(self, session: Any, poke: Any) -> None:
        self.poke = poke  # the document's edit signal

    def stop(self, session: Any) -> None:
        self.previews -= 1
        self.preview = None


def settle(seconds: float = 0.05) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents(QEventLoop.AllEvents, 10)


class Live:
    """A docker with live refine on a fake live document, connected to a fake service."""

    def __init__(self, app: QApplication, ctx: Any, **settings: Any) -> None:
        self.app = app
        self.service = FakeService(ctx)
        self.adapter = FakeAdapter()
        store = {"endpoint": self.service.endpoint, "live_wait_ms": "60", "steps": "30", "strength": "0.3"}
        self.adapter.store.update({**store, **{k: str(v) for k, v in settings.items()}})
        self.port = FakeLive()
        client = Client(self.service.endpoint, interval=0.05, timeout=0.5, context=ctx)
        self.controller = build_controller(self.adapter, client=client, live=self.port)
        self.live = self.controller.live
        self.panel = RefinerPanel(self.controller)
        self.panel.resize(340, 900)
        self.panel.show()
        self.controller.start()
        self.pump(lambda: self.controller.client.is_connected)

    def pump(self, until: Any, timeout: float = 5.0) -> None:
        pump(self.app, until, [self.service], timeout)

    def submits(self) -> list[Any]:
        return [m for _i, m in self.service.of_type("submit")]

    def wait_submits(self, n: int) -> Any:
        self.pump(lambda: len(self.submits()) >= n)
        return self.submits()[n - 1]

    def answer(self, msg: Any, fill: int | None = None, **fields: Any) -> bytes:
        """The service's result for a submit: its image with every byte ``fill`` (default: 255 - its own)."""
        ident = self.service.of_type("submit")[0][0]
        spec = msg.images["image"].spec
        data = bytes([fill if fill is not None else 255 - bytes(msg.images["image"].data)[0]]) * spec.byte_length
        self.service.send(ident, "accepted", job=msg["job"], position=0, seed=msg["seed"], steps=msg["steps"],
                          denoise_steps=1)  # fmt: skip
        self.service.send(ident, "result", images={"image": Image(spec, data)}, job=msg["job"], seed=msg["seed"],
                          elapsed=0.1, **fields)  # fmt: skip
        return data

    def event(self, msg_type: str, **fields: Any) -> None:
        self.service.send(self.service.of_type("submit")[0][0], msg_type, **fields)

    def click(self, widget: Any) -> None:
        settle(0.02)
        assert widget.isVisible() and widget.isEnabled(), widget.text()
        QTest.mouseClick(widget, Qt.LeftButton)
        settle(0.02)

    def messages(self) -> list[str]:
        return [text for _level, text in self.panel.messages.entries]

    def close(self) -> None:
        self.panel.hide()
        self.panel.deleteLater()
        self.controller.shutdown()
        self.service.close()


@pytest.fixture
def live(app, ctx):
    made: list[Live] = []

    def make(**settings: Any) -> Live:
        made.append(Live(app, ctx, **settings))
        return made[-1]

    yield make
    for docker in made:
        docker.close()


# -- the workflow, through the docker's buttons ----------------------------------------------------


def test_live_on_sends_a_capped_job_and_shows_its_result_in_the_one_preview(live):
    d = live()
    bar = d.panel.live
    assert not bar.options.isVisible() and not bar.apply_button.isEnabled()
    d.click(bar.toggle)
    assert d.live.on and d.port.previews == 1 and bar.options.isVisible()
    first = d.wait_submits(1)  # the first preview at once, without a change
    s = d.controller.settings
    assert first["live"] is True and first["replaces"] is None and first["mode"] == "refine"
    assert first["steps"] == capped_steps(30, 0.3, 6) == 20 and first["preview"] is False
    assert first["seed"] == d.live.seed and first["seed"] is not None
    assert (first["work_width"], first["work_height"]) == tuple(live_work(Extent(300, 200), s.live_side))
    data = d.answer(first)
    d.pump(lambda: d.port.shown)
    assert d.port.preview == (Box(0, 0, 300, 200), data) and d.port.previews == 1
    assert d.live.latency is not None and bar.apply_button.isEnabled()
    assert f"seed {d.live.seed}" in bar.status.text() and " s" in bar.status.text()


def test_each_change_replaces_the_previous_job_with_the_same_seed(live):
    d = live()
    d.click(d.panel.live.toggle)
    first = d.wait_submits(1)
    d.port.paint()
    second = d.wait_submits(2)
    assert second["replaces"] == first["job"] and second["seed"] == first["seed"]
    assert bytes(second.images["image"].data) != bytes(first.images["image"].data)
    d.event("cancelled", job=first["job"], reason="superseded")
    d.answer(second)
    d.pump(lambda: d.port.shown)
    assert d.live.superseded == 1 and len(d.port.shown) == 1
    d.panel.prompt.setPlainText("a stormy sea")  # a new prompt: a new job, without a stroke
    third = d.wait_submits(3)
    assert third["prompt"] == "a stormy sea" and third["replaces"] == second["job"]
    d.click(d.panel.live.seed_button)  # a new seed: a new job with it
    fourth = d.wait_submits(4)
    assert fourth["seed"] != third["seed"] and fourth["seed"] == d.live.seed


def test_the_canvas_must_be_still_for_the_wait_before_a_job_starts(live):
    d = live(live_wait_ms=400)
    d.click(d.panel.live.toggle)
    d.wait_submits(1)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:  # a stroke that goes on for a second: no job meanwhile
        d.port.paint()
        d.pump(lambda: True)
        settle(0.04)
        assert len(d.submits()) == 1
    started = time.monotonic()
    d.wait_submits(2)
    assert time.monotonic() - started >= 0.35


def test_the_newest_result_wins_and_a_late_older_one_is_not_shown(live):
    d = live()
    d.click(d.panel.live.toggle)
    first = d.wait_submits(1)
    d.port.paint()
    second = d.wait_submits(2)
    newer = d.answer(second, fill=9)
    d.pump(lambda: d.port.shown)
    d.answer(first, fill=3)  # finished on another replica before it could be stopped
    settle(0.2)
    d.pump(lambda: True)
    assert d.port.shown == [newer]


def test_while_the_pen_is_down_nothing_is_captured_and_a_result_waits(live):
    d = live()
    d.click(d.panel.live.toggle)
    first = d.wait_submits(1)
    d.port.busy = True
    data = d.answer(first)
    d.port.paint()
    settle(0.4)
    d.pump(lambda: True)
    assert d.port.shown == [] and len(d.submits()) == 1  # held back: no stroke is cut short
    d.port.busy = False
    d.pump(lambda: d.port.shown == [data])
    d.wait_submits(2)  # the change made while the pen was down


def test_apply_makes_a_layer_and_a_history_entry_and_live_off_removes_the_preview(live):
    d = live()
    bar = d.panel.live
    d.click(bar.toggle)
    first = d.wait_submits(1)
    data = d.answer(first)
    d.pump(lambda: bar.apply_button.isEnabled())
    d.click(bar.apply_button)
    name, box, pixels = d.port.applied[0]
    assert pixels == data and box == Box(0, 0, 300, 200)
    assert name.startswith("seed ") and name.endswith(" · Live · a red barn")  # what tells results apart first
    entry = next(iter(d.controller.history))
    assert entry.name == name and entry.applied and entry.seed == first["seed"]
    assert any(m.startswith(f"Added layer “{name}") for m in d.messages()), d.messages()
    d.port.paint()
    second = d.wait_submits(2)
    d.click(bar.toggle)  # off while a job runs: it is cancelled, the preview removed
    assert not d.live.on and d.port.previews == 0 and not bar.options.isVisible()
    d.pump(lambda: any(m["job"] == second["job"] for _i, m in d.service.of_type("cancel")))
    d.port.paint()
    settle(0.3)
    d.pump(lambda: True)
    assert len(d.submits()) == 2


def test_a_preview_layer_deleted_or_undone_turns_live_off_with_the_reason(live):
    d = live()
    d.click(d.panel.live.toggle)
    first = d.wait_submits(1)
    d.port.gone = "the “Live preview” layer of paint.kra was deleted or undone"
    d.answer(first)
    d.pump(lambda: not d.live.on)
    assert not d.panel.live.toggle.isChecked()
    assert any("Live is off: the “Live preview” layer" in m for m in d.messages())


def test_a_problem_that_lasts_is_told_once(live):
    d = live()
    d.click(d.panel.live.toggle)
    first = d.wait_submits(1)
    for _ in range(3):
        d.event("error", job=first["job"], code="bad_field", message="strength 0.0001 is too small", field="strength")
        d.port.paint()
        first = d.wait_submits(len(d.submits()) + 1)
    d.event("error", job=first["job"], code="bad_field", message="strength 0.0001 is too small", field="strength")
    d.pump(lambda: "too small" in d.panel.live.status.text())
    assert sum("too small" in m for m in d.messages()) == 1


def test_live_settings_are_typed_and_kept(live):
    d = live()
    bar = d.panel.live
    d.click(bar.toggle)
    d.wait_submits(1)
    bar.calls.setValue(3)
    third = d.wait_submits(2)
    assert third["steps"] == capped_steps(30, 0.3, 3) and d.adapter.written["live_calls"] == "3"
    bar.side.setValue(256)
    small = d.wait_submits(3)
    assert max(small["work_width"], small["work_height"]) <= 256


# -- the pure parts --------------------------------------------------------------------------------


def test_a_byte_changed_anywhere_is_seen_within_one_round_of_bands():
    box = Box(0, 0, 4096, 3000)
    parts = bands(box)
    assert len(parts) == 6 and all(b.width * b.height <= BAND_PIXELS for b in parts)
    assert sum(b.height for b in parts) == 3000 and parts[0].y == 0 and parts[-1].bottom == 3000
    picture = bytearray(4096 * 3000)

    def read(b: Box) -> bytes:
        return bytes(picture[b.y * 4096 : b.bottom * 4096])

    shape = Shape(Extent(4096, 3000), None)
    watch = Watch()
    watch.reset(shape, box, read)
    for row in (0, 1500, 2999):
        picture[row * 4096 + 7] ^= 1
        seen = [watch.check(shape, box, read) for _ in parts]
        assert seen.count(True) == 1, (row, seen)
        assert not any(watch.check(shape, box, read) for _ in parts)
    assert watch.check(Shape(Extent(4096, 3000), Box(1, 1, 5, 5)), box, read)  # a new selection


def test_source_image_changes_are_seen_in_the_layers_and_history_another_painted_layer_is_no_change():
    box = Box(0, 0, 64, 64)
    layer_a, layer_b = bytes(64 * 64 * 4), bytes([1]) * (64 * 64 * 4)
    shape = Shape(Extent(64, 64), None, layers=(("a", True, 255, "normal"),), history=(3, 2), reader="a")
    watch = Watch()
    assert watch.check(shape, box, lambda b: layer_a)  # the first look: a change (the first preview)
    assert not watch.check(shape, box, lambda b: layer_a)
    other = Shape(Extent(64, 64), None, layers=(("a", True, 255, "normal"),), history=(3, 2), reader="b")
    assert not watch.check(other, box, lambda b: layer_b)  # another layer chosen: a new baseline only
    assert watch.check(other, box, lambda b: layer_a)  # ... whose pixels then change
    hidden = Shape(Extent(64, 64), None, layers=(("a", False, 255, "normal"),), history=(3, 2), reader="b")
    assert watch.check(hidden, box, lambda b: layer_a)
    undone = Shape(Extent(64, 64), None, layers=(("a", False, 255, "normal"),), history=(3, 1), reader="b")
    assert watch.check(undone, box, lambda b: layer_a)


def test_the_watched_area_is_what_a_refine_reads():
    canvas = Extent(640, 480)
    assert watched_box(canvas, None, 0.06) == Box(0, 0, 640, 480)
    inside = watched_box(canvas, Box(100, 100, 50, 40), 0.06)
    assert inside.contains(Box(100, 100, 50, 40)) and inside.width < 200


def test_stillness_waits_for_the_last_change():
    still = Stillness(0.25)
    still.changed(1.0)
    assert not still.due(1.2)
    still.changed(1.2)
    assert not still.due(1.4) and still.due(1.45)
    still.fired()
    assert not still.due(9.0)


SIZES = [((300, 200), 1024, (296, 200)), ((2000, 1000), 1024, (1024, 512)), ((4000, 3000), 768, (768, 576)),
         ((7, 5), 1024, (8, 8))]  # fmt: skip


@pytest.mark.parametrize(("area", "side", "work"), SIZES)
def test_the_live_work_size_is_the_area_capped_never_scaled_up(area, side, work):
    assert tuple(live_work(Extent(*area), side)) == work


@pytest.mark.parametrize("depth", ["U8", "U16", "F16", "F32"])
def test_the_quick_visibility_check_finds_one_pixel_anywhere_under_the_mask(depth):
    from krita_sdxl_refiner.core.pixelformat import any_visible

    fmt, n = pixel_format("RGBA", depth), 1000
    bpp, size = fmt.bytes_per_pixel, fmt.depth // 8
    alpha = fmt.order.index("A") * size
    assert not any_visible(fmt, bytes(n * bpp))
    for px in (0, 1, 60, 61, 999):  # on and off the sampled pixels (every 61st)
        data = bytearray(n * bpp)
        data[px * bpp + alpha + size - 1] = 1
        mask = bytearray([255]) * n
        assert any_visible(fmt, bytes(data)) and any_visible(fmt, bytes(data), bytes(mask)), px
        mask[px] = 0
        assert not any_visible(fmt, bytes(data), bytes(mask)), px
