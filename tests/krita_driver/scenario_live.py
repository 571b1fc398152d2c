"""E2E inside real Krita: live refine driven as an artist drives it, against a real backend.

layer: a W x H document with an opaque patterned "Source" layer (active). Live is clicked on; the first
   preview comes at once (its job time sets the pauses); then 5 strokes are painted on Source through the
   Krita API (a few writes each, 30 ms apart, as a stroke grows), with pauses shorter than a job (the
   next job supersedes the running one) and longer (the preview shows). A 10 ms timer counts the
   "Live preview" layers all along and records the UI thread's largest stall. At the end: the final
   preview's pixels and the final painting go to files (the test refines the same painting with the same
   settings, without ``live``, and compares), the undo stack's size (Krita's History docker) before and
   after, Apply clicked (a layer equal to the preview, a history entry), Live clicked off (no preview).
image: Source: Image chosen, Live on, one stroke: the captured picture must be the painting without the
   preview on top (the preview is opaque and different: a feedback loop would show), then Live off.

params: width, height, timeout_s, out_dir (files), strokes (pause kinds), wait_ms
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from PyQt5.QtCore import QEvent, QPoint, QPointF, Qt, QTimer  # type: ignore[import-not-found]
from PyQt5.QtGui import QMouseEvent  # type: ignore[import-not-found]
from PyQt5.QtWidgets import QAbstractItemView, QApplication, QWidget  # type: ignore[import-not-found]
from scenario_tools import Probe, Ticker, click, find_docker, pattern, until

PREVIEW = "Live preview"
STROKES = ("short", "short", "long", "short", "long")


def undo_rows(app: Any) -> int:
    """Entries in Krita's undo stack, as its Undo History docker lists them."""
    for docker in app.dockers():
        if docker.objectName() == "History":
            views = docker.findChildren(QAbstractItemView)
            if views and views[0].model() is not None:
                return views[0].model().rowCount()
    raise AssertionError("Krita's Undo History docker was not found")


class Counter:
    """Counts the "Live preview" layers every 10 ms (min and max seen) while it runs."""

    def __init__(self, ctx: Any, doc: Any) -> None:
        self.ctx, self.doc = ctx, doc
        self.seen: list[int] = []
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self.count)

    def count(self) -> None:
        self.seen.append(sum(1 for n in self.ctx.all_nodes(self.doc) if n.name() == PREVIEW))

    def start(self) -> None:
        self.timer.start()

    def stop(self) -> dict[str, int]:
        self.timer.stop()
        self.count()
        return {"min": min(self.seen), "max": max(self.seen), "samples": len(self.seen)}


def stroke(doc: Any, layer: Any, x: int, y: int, color: tuple[int, int, int]) -> Any:
    """A square "stroke" grown in four writes 30 ms apart (BGRA), redrawn as Krita redraws a stroke."""
    b, g, r = color
    for step in range(1, 5):
        side = 12 * step
        layer.setPixelData(bytes((b, g, r, 255)) * (side * side), x, y, side, side)
        doc.refreshProjection()
        yield 30
    return time.monotonic()


def canvas(app: Any) -> Any:
    """Krita's canvas widget in the active window (OpenGL or QPainter)."""
    names = ("KisOpenGLCanvas2", "KisQPainterCanvas")
    found = [w for w in app.activeWindow().qwindow().findChildren(QWidget) if w.metaObject().className() in names]
    visible = [w for w in found if w.isVisible()]
    if not visible:
        raise AssertionError(f"no visible canvas widget among {[w.metaObject().className() for w in found]}")
    return visible[0]


def mouse_stroke(app: Any, dx: int, dy: int) -> Any:
    """A real brush stroke with the mouse (press, 12 moves 15 ms apart, release) from the canvas's middle,
    as a person draws: Krita's brush tool paints it and pushes its undo step ("Freehand Brush Stroke")."""
    widget = canvas(app)
    start = widget.rect().center()

    def send(kind: Any, pos: Any, button: Any, buttons: Any) -> None:
        event = QMouseEvent(kind, QPointF(pos), QPointF(widget.mapToGlobal(pos)), button, buttons, Qt.NoModifier)
        QApplication.sendEvent(widget, event)

    send(QEvent.MouseButtonPress, start, Qt.LeftButton, Qt.LeftButton)
    for i in range(1, 13):
        yield 15
        send(QEvent.MouseMove, start + QPoint(dx * i // 12, dy * i // 12), Qt.NoButton, Qt.LeftButton)
    send(QEvent.MouseButtonRelease, start + QPoint(dx, dy), Qt.LeftButton, Qt.NoButton)
    return time.monotonic()


def previews(ctx: Any, doc: Any) -> list[Any]:
    return [n for n in ctx.all_nodes(doc) if n.name() == PREVIEW]


def run(ctx: Any) -> Any:
    p = ctx.params
    width, height = p.get("width", 512), p.get("height", 384)
    out_dir = Path(p["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    docker = find_docker(ctx.app)
    docker.show()
    docker.raise_()
    panel = docker.widget()
    controller = panel.controller
    live = controller.live
    bar = panel.live
    doc = ctx.new_document(width, height, "live-e2e")
    data = pattern(width, height)
    source = ctx.add_paint_layer(doc, "Source", data)
    doc.setActiveNode(source)
    doc.refreshProjection()
    yield from until(ctx, lambda: controller.client.is_connected, 60, "the docker to connect")
    yield 500
    doc.waitForDone()
    out: dict[str, Any] = {"undo": {"before": undo_rows(ctx.app)}}
    counter = Counter(ctx, doc)
    ticker = Ticker(10)

    # --- Source: Layer ---------------------------------------------------------------------------
    layers_before = len(ctx.all_nodes(doc))
    probe = Probe()  # the plugin's own calls on Krita's UI thread: a stall of the plugin shows here
    probe.wrap(live, "_tick", "tick")
    probe.wrap(controller.client, "_handle", "message")
    probe.wrap(live, "set_on", "on/off")
    ticker.start()
    click(bar.toggle)
    counter.start()
    yield from until(ctx, lambda: live.latency is not None, p.get("timeout_s", 120), "the first live preview")
    first = live.timeline[-1]
    job_s = max(first["result"] - first["sent"], 0.05)
    wait_s = controller.settings.live_wait_ms / 1000
    out["first"] = {"job_s": round(job_s, 3), "latency_s": round(live.latency, 3)}
    out["active_after_on"] = doc.activeNode().name()
    out["undo"]["after_on"] = undo_rows(ctx.app)
    preview = previews(ctx, doc)[0]
    siblings = [n.name() for n in source.parentNode().childNodes()]
    out["preview_above_source"] = siblings.index(PREVIEW) == siblings.index("Source") + 1
    colours = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255)]
    pauses = []
    mouse = 0
    for i, kind in enumerate(p.get("strokes", STROKES)):
        if i == 3:  # one stroke with the mouse and Krita's brush, as a person paints
            ended = yield from mouse_stroke(ctx.app, 60, 30)
            mouse += 1
        else:
            ended = yield from stroke(doc, source, (40 + 70 * i) % (width - 48), (30 + 40 * i) % (height - 48),
                                      colours[i % len(colours)])  # fmt: skip
        data_now = bytes(source.pixelData(0, 0, width, height))
        # short: the next stroke comes just after the job went out (the first job's time, warm-up included,
        # overstates the later ones); long: the preview shows before the next stroke
        pause = wait_s + min(job_s / 3, 0.1) if kind == "short" else wait_s + 2 * job_s + 1.0
        pauses.append(round(pause, 3))
        yield int(pause * 1000)
        ctx.log(f"stroke {i} ({kind}) ended {time.monotonic() - ended:.2f} s ago; superseded so far {live.superseded}")
    out["pauses_s"] = pauses
    out["mouse_strokes"] = mouse
    doc.waitForDone()
    data_now = bytes(source.pixelData(0, 0, width, height))  # with the brush stroke, done

    def settled() -> bool:  # the newest job sent has been shown, nothing is pending
        shown = live._shown
        return not live._jobs and not live._still.pending and shown is not None and shown.job.id == live._last_id

    yield from until(ctx, settled, p.get("timeout_s", 120), "the last live preview")
    yield 300
    out["ui"] = ticker.stop()  # before the screenshot below, which holds the UI thread itself
    out["layer_count"] = {"before": layers_before, "live": len(ctx.all_nodes(doc))}
    out["superseded"] = live.superseded
    out["updates"] = len(live.timeline)
    out["undo"]["after_updates"] = undo_rows(ctx.app)
    out["active_after_updates"] = doc.activeNode().name()
    shown = live._shown
    crop = shown.job.plan.crop
    painting = bytes(source.projectionPixelData(*crop))
    out["final"] = {
        "crop": list(crop),
        "fields": {k: v for k, v in shown.job.submit_fields().items() if k != "job"},
        "seed": shown.job.seed,
        "captured_is_final_painting": bytes(shown.job.images["image"].data) == painting,
        "spec": [shown.job.fmt.spec(crop.width, crop.height).order, shown.job.fmt.spec(1, 1).depth],
    }
    preview_pixels = bytes(preview.pixelData(*crop))
    (out_dir / "painting.bgra").write_bytes(painting)
    (out_dir / "preview.bgra").write_bytes(preview_pixels)
    out["preview_differs_from_painting"] = preview_pixels != painting
    ctx.save_bgra_png("live-preview", preview_pixels, crop.width, crop.height)
    shot = ctx.artifact_path("docker")
    if shot is not None and docker.grab().save(str(shot), "PNG"):  # the docker while Live is on (README)
        ctx.files.append(str(shot))
    ctx.screenshot("live-screen")

    # --- Apply, then Live off ------------------------------------------------------------------
    history_before = len(controller.history)
    click(bar.apply_button)
    yield 300
    applied = [n for n in ctx.all_nodes(doc) if " · Live" in n.name() and n.name() != "Live preview"]
    out["apply"] = {
        "layers": [n.name() for n in applied],
        "equal_to_preview": len(applied) == 1 and bytes(applied[0].pixelData(*crop)) == preview_pixels,
        "history_added": len(controller.history) - history_before,
        "undo": undo_rows(ctx.app),
        "active": doc.activeNode().name(),
        "order": [n.name() for n in source.parentNode().childNodes()],
    }
    out["live_counts"] = counter.stop()
    out["slow_plugin_calls"] = probe.slow(0.05)
    out["plugin_calls_max_ms"] = {
        label: round(max((d for lab, _t, d in probe.records if lab == label), default=0.0) * 1000, 1)
        for label in ("on/off", "tick", "message")
    }
    click(bar.toggle)
    yield 300
    out["after_off"] = {"previews": len(previews(ctx, doc)), "undo": undo_rows(ctx.app), "on": live.on}
    out["source_unchanged_by_plugin"] = hashlib.sha256(bytes(source.pixelData(0, 0, width, height))).hexdigest() == (
        hashlib.sha256(data_now).hexdigest()
    )

    # --- Source: Image ---------------------------------------------------------------------------
    for layer in applied:
        layer.remove()  # the image is the painting again (the applied result would cover it)
    panel.source.setCurrentIndex(panel.source.findData("canvas"))
    yield 100
    click(bar.toggle)
    yield from until(ctx, lambda: live.latency is not None, p.get("timeout_s", 120), "the first image preview")
    top = [n.name() for n in doc.topLevelNodes()]
    sent_before = live._last_id
    yield from stroke(doc, source, width // 2, height // 2, (40, 200, 90))
    yield from until(ctx, lambda: live._last_id != sent_before and settled(), p.get("timeout_s", 120), "a preview")
    shown = live._shown
    crop = shown.job.plan.crop
    doc.refreshProjection()
    captured = bytes(shown.job.images["image"].data)
    visible = bytes(doc.pixelData(*crop))  # with the preview on top
    out["image"] = {
        "preview_on_top": top[-1] == PREVIEW,
        "captured_is_painting": captured == bytes(source.pixelData(*crop)),  # Source is opaque: what shows
        "captured_is_not_visible": captured != visible,
        "updates": len(live.timeline),
    }
    click(bar.toggle)
    yield 200
    out["image"]["previews_after_off"] = len(previews(ctx, doc))
    panel.source.setCurrentIndex(panel.source.findData("layer"))
    out["messages"] = [f"{level}: {text}" for level, text in panel.messages.entries]
    return out
