"""E2E inside real Krita: the SDXL Refiner docker used as an artist uses it, every control clicked
with the mouse (QTest) on the docker's own widgets, against real backends. Phases (params "phases",
default all, in this order):

layout (always, first): Krita's main window with its default dockers and this one fits the screen (run at
   1280x720: a laptop), status bar included; the docker's content scrolls; a screenshot.
measure: a 640x480 8-bit document, a selection partly off the canvas, the prompt typed, Run
   clicked; a new layer appears. A 10 ms QTimer runs meanwhile (its largest gap = how long Krita's
   UI thread was blocked; also measured idle, before the click, for comparison) and a probe times the
   plugin's own work on that thread. Screenshots before and after, of the screen and of the docker.
again: "Again" on the result: a second layer from the same captured pixels, stacked above the
   first (the result layer is the active one now). A picture of the docker while it runs.
stack: Run three times before the first result is back: the three layers stack newest on top, above
   the earlier results of the same layer, and the canvas (the projection's pixels) shows the newest.
empty: a new, empty layer made active; Refine over the selection is refused with a message that
   says why (the selection holds only transparent pixels), no job starts and no layer appears.
queue: the endpoint typed in the settings dialog points nowhere; two jobs wait; one row's Cancel,
   then the Cancel button: a line in the message log for each. The connection line, cut with "…".
dialog: the ⚙ dialog: a mistyped endpoint disables OK with the reason shown, Enter does nothing, Cancel
   forgets it; the Backend row describes the backend connected now; Repair is disabled (nothing set up).
kept: a job of a second document, which is closed before the backend is back: its result is kept
   in the history; Apply (to the shown document), Open (as a new document), Discard.
big: a 6000x4000 layer: Run; the largest stall of Krita's UI thread from the click until the job is sent
   (the pixels are read off the UI thread), and the plugin's own work on that thread; then Cancel.
local: Start backend (the docker runs ``python -m krita_sdxl.backend.cli serve --demo``), Refine,
   Stop backend while the job runs (the job is lost, not cancelled), Start again, Resubmit: the
   layer appears, with the seed the lost job had.

params: rect [x, y, w, h], prompt, good_endpoint, dead_endpoint, local_endpoint, python, backend_args,
timeout_s, tick_ms, settle_ms, idle_ms, slow_steps, phases
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenario_tools import Probe, Ticker, click, find_docker, pattern, type_into, until

W, H = 640, 480
PHASES = ("measure", "again", "stack", "empty", "queue", "dialog", "kept", "big", "local")
BIG = (6000, 4000)


class Session:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.p = ctx.params
        self.app = ctx.app
        self.docker = find_docker(self.app)
        self.docker.show()
        self.docker.raise_()
        self.panel = self.docker.widget()
        self.controller = self.panel.controller
        self.out: dict[str, Any] = {}
        self.doc = ctx.new_document(W, H, "docker-e2e")
        self.data = pattern(W, H)
        self.source = ctx.add_paint_layer(self.doc, "Source", self.data)
        self.doc.setActiveNode(self.source)
        self.probe = Probe()
        self.first: Any = None

    def ids(self) -> set[str]:
        return {self.ctx.node_id(n) for n in self.ctx.all_nodes(self.doc)}

    def new_layers(self, before: set[str]) -> list[Any]:
        ctx = self.ctx
        return [
            n
            for n in ctx.all_nodes(self.doc)
            if ctx.node_id(n) not in before and n.type().endswith("layer") and not n.bounds().isEmpty()
        ]

    def grab(self, label: str) -> None:
        path = self.ctx.artifact_path(label)
        if path is not None and self.docker.grab().save(str(path), "PNG"):
            self.ctx.files.append(str(path))

    def messages(self) -> list[str]:
        return [text for _level, text in self.panel.messages.entries]


def run(ctx: Any) -> Any:
    s = Session(ctx)
    x, y, w, h = s.p["rect"]
    ctx.select_rect(s.doc, x, y, w, h)
    s.doc.refreshProjection()
    yield from until(ctx, lambda: s.controller.client.is_connected, 60, "the docker to connect to the backend")
    yield 500  # let the window, the views and the docker settle
    s.doc.waitForDone()
    s.out["layout"] = layout(s)
    s.out["layout"]["repaint_ms"] = repaint_ms(s.panel)
    ctx.screenshot("layout")
    for phase in s.p.get("phases", PHASES):
        ctx.log(f"phase {phase}")
        known = set(s.out)
        try:
            yield from globals()[f"phase_{phase}"](s)
            added = {k: v for k, v in s.out.items() if k not in known}
            ctx.log(f"{phase}: {added}")  # in the story, if a later phase fails
        except Exception as exc:
            jobs = [(j.state.value, j.status_text) for j in s.controller.jobs]
            raise AssertionError(f"phase {phase}: {exc}\nmessages: {s.messages()}\njobs: {jobs}") from exc
    s.out["messages"] = [f"{level}: {text}" for level, text in s.panel.messages.entries]
    s.out["internal_errors"] = [t for t in s.messages() if "Internal error" in t]
    s.grab("docker-end")
    return s.out


def phase_measure(s: Session) -> Any:
    ctx, panel, controller, p = s.ctx, s.panel, s.controller, s.p
    x, y, w, h = p["rect"]
    type_into(panel.prompt, p["prompt"])
    if controller.settings.prompt != p["prompt"]:
        raise AssertionError(f"typed {p['prompt']!r}, the settings hold {controller.settings.prompt!r}")
    yield 300  # screenshots block Krita's UI thread: let it paint first
    ctx.screenshot("before")
    s.grab("docker-before")
    idle = Ticker(p.get("tick_ms", 10))
    idle.start()
    yield p.get("idle_ms", 2000)
    idle_ui = idle.stop()
    before = s.ids()
    probe = s.probe
    probe.wrap(controller.adapter, "capture")
    probe.wrap(controller.adapter, "apply")
    probe.wrap(controller.client, "_handle", "message")
    probe.wrap(controller.client, "send", "encode and send")
    probe.wrap(controller, "_submit", "submit (send, queue and progress views)")
    probe.wrap(controller, "_thumbnail", "thumbnail")
    probe.wrap(panel.history, "update_results", "history view")
    probe.wrap(panel.history, "update_jobs", "queue view")
    probe.wrap(panel.history, "set_preview", "preview view")
    probe.wrap(sys.modules["krita_sdxl_refiner.adapters.buffers"], "preview_image", "preview decode")
    probe.wrap(sys.modules["krita_sdxl_refiner.adapters.client"], "decode", "decode")
    probe.wrap(panel.progress, "setValue", "progress bar")
    probe.wrap(panel.progress, "setFormat", "progress text")
    probe.wrap(panel.messages, "add", "message log")
    ticker = Ticker(p.get("tick_ms", 10))
    ticker.start()
    started = time.monotonic()
    click(panel.refine_button)
    click_ms = round((time.monotonic() - started) * 1000, 1)  # press, release and everything Refine does at once
    timeout = p.get("timeout_s", 60)
    waited = yield from until(ctx, lambda: s.new_layers(before), timeout, "the result layer")
    yield p.get("settle_ms", 750)
    ui = ticker.stop()
    ui["probe_slow_ms"] = probe.slow()
    labels = {label for label, _t, _d in probe.records}
    ui["probe_worst_ms"] = {
        label: round(max(d for lb, _t, d in probe.records if lb == label) * 1000, 1) for label in sorted(labels)
    }
    ui["idle"] = {k: idle_ui[k] for k in ("max_gap_ms", "p99_gap_ms", "over_100ms", "top_gaps_ms")}
    ui["click_ms"] = click_ms
    (s.first,) = s.new_layers(before)
    s.out["measure"] = {"time_to_layer_s": round(waited, 3), "total_s": round(time.monotonic() - started, 3), "ui": ui}
    ctx.log(f"measure: {s.out['measure']}")
    first = describe_layer(ctx, s.first, s.source)
    first["alpha"] = alpha_check(s.first, x, y, w, h)
    s.out["first"] = first
    s.out["source_unchanged"] = (
        hashlib.sha256(bytes(s.source.pixelData(0, 0, W, H))).digest() == hashlib.sha256(s.data).digest()
    )
    s.out["active_after_refine"] = s.doc.activeNode().name() if s.doc.activeNode() else None
    entry = controller.history.newest_first()[0]
    row = panel.history.result_rows[entry.id]
    s.out["first_row"] = {
        "title": row.title.text(),
        "detail": row.detail.text(),
        "thumbnail": bool(row.thumb.pixmap() and not row.thumb.pixmap().isNull()),
    }
    s.out["messages_after_refine"] = s.messages()
    s.out["run_button"] = [panel.refine_button.text(), panel.mode.currentText()]
    yield 300
    ctx.screenshot("after")
    s.grab("docker-after")
    click(panel.advanced_section.button)
    yield 300
    s.grab("docker-advanced")
    s.out["advanced_visible"] = panel.advanced.denoising_end.isVisible()
    s.out["advanced_field_width"] = panel.advanced.denoising_end.width()
    click(panel.advanced_section.button)
    yield 100


def phase_again(s: Session) -> Any:
    ctx, panel, controller = s.ctx, s.panel, s.controller
    entry = controller.history.newest_first()[0]
    row = panel.history.result_rows[entry.id]
    before = s.ids()
    captures = sum(1 for label, _t, _d in s.probe.records if label == "capture")
    click(row.again_button)
    yield from until(ctx, lambda: panel.history.job_rows, 10, "the Again job in the queue")
    yield from until(
        ctx, lambda: s.new_layers(before) or controller.jobs.current().step > 0, 60, "the Again job to run"
    )
    s.grab("docker-during")
    yield from until(ctx, lambda: s.new_layers(before), s.p.get("timeout_s", 60), "the Again layer")
    (second,) = s.new_layers(before)
    s.out["again"] = describe_layer(ctx, second, s.first)
    s.out["again"]["captures"] = sum(1 for label, _t, _d in s.probe.records if label == "capture") - captures


def phase_stack(s: Session) -> Any:
    ctx, panel, controller = s.ctx, s.panel, s.controller
    s.doc.setActiveNode(s.source)
    fixed, steps = controller.settings.seed, controller.settings.steps
    controller.update_settings(seed=-1, steps=2)  # "Random": three different results; one step each
    yield 100
    before = s.ids()
    for _ in range(3):
        click(panel.refine_button)
    jobs = [j for j in controller.jobs if not j.state.finished]
    yield from until(ctx, lambda: len(s.new_layers(before)) == 3, 3 * s.p.get("timeout_s", 60), "three results")
    yield 300
    s.doc.waitForDone()
    names = {j.layer_name: j.number for j in jobs}
    siblings = [n for n in s.source.parentNode().childNodes()]  # bottom to top
    order = [n.name() for n in siblings]
    new = sorted(s.new_layers(before), key=lambda n: names.get(n.name(), 0))
    x, y, w, h = s.p["rect"]
    cx, cy, cw, ch = x + w // 4, y + h // 4, min(w, 640 - x) // 2, min(h, 480 - y) // 2  # inside the selection
    shown = bytes(s.doc.pixelData(cx, cy, cw, ch))  # the canvas: the projection's pixels
    layers = [bytes(n.pixelData(cx, cy, cw, ch)) for n in new]
    opaque = all(a == 255 for a in layers[-1][3::4])
    earlier = [n for n in siblings if n.name().startswith("#") and n.name() not in names]
    s.out["stack"] = {
        "names": [n.name() for n in new],
        "numbers": [names.get(n.name()) for n in new],
        "positions": [order.index(n.name()) for n in new],
        "source_position": order.index(s.source.name()),
        "others_below": all(order.index(n.name()) < order.index(new[0].name()) for n in earlier),
        "opaque_newest": opaque,
        "canvas_is_newest": shown == layers[-1],
        "canvas_is_oldest": shown == layers[0],
        "layers_differ": layers[0] != layers[-1],
    }
    ctx.screenshot("stack")
    controller.update_settings(seed=fixed, steps=steps)


def phase_empty(s: Session) -> Any:
    ctx, panel, controller = s.ctx, s.panel, s.controller
    empty = ctx.add_paint_layer(s.doc, "Empty")
    s.doc.setActiveNode(empty)
    yield 100
    before, jobs, seen = s.ids(), len(list(controller.jobs)), len(s.messages())
    click(panel.refine_button)
    yield 300
    s.out["empty"] = {
        "messages": s.messages()[seen:],
        "new_jobs": len(list(controller.jobs)) - jobs,
        "new_layers": [n.name() for n in s.new_layers(before)],
    }
    empty.remove()
    s.doc.setActiveNode(s.source)
    yield 100


def set_endpoint(s: Session, endpoint: str) -> None:
    """⚙, the endpoint typed, Enter (OK): saved, the dialog closed."""
    panel = s.panel
    if not panel.dialog.isVisible():
        click(panel.settings_button)
    type_into(panel.dialog.endpoint, endpoint, enter=True)
    if panel.dialog.isVisible() or s.controller.settings.endpoint != endpoint:
        raise AssertionError(f"Enter in the endpoint did not save {endpoint!r} and close the dialog")


def phase_queue(s: Session) -> Any:
    ctx, panel, controller = s.ctx, s.panel, s.controller
    set_endpoint(s, s.p["dead_endpoint"])
    yield from until(ctx, lambda: not controller.client.is_connected, 10, "the docker to leave the backend")
    click(panel.refine_button)
    click(panel.refine_button)
    yield 50
    waiting = [j for j in controller.jobs if j.state.value == "waiting"]
    if len(waiting) != 2 or len(panel.history.job_rows) != 2:
        raise AssertionError(f"expected 2 waiting jobs with rows: {[j.state for j in controller.jobs]}")
    click(panel.history.job_rows[waiting[0].id].cancel_button)
    yield 50
    one = [waiting[0].state.value, waiting[1].state.value]
    row_message = s.messages()[-1]
    click(panel.cancel_button)
    yield 50
    s.out["queue"] = {
        "after_row_cancel": one,
        "after_cancel": [waiting[0].state.value, waiting[1].state.value],
        "rows_left": len(panel.history.job_rows),
    }
    s.out["queue_messages"] = [row_message, s.messages()[-1]]
    yield from until(ctx, lambda: controller.client.detail.startswith("no answer"), 20, "the connection to time out")
    yield 100
    line = panel.connection
    s.out["connection_line"] = {
        "full": line.full_text,
        "shown": line.shown,
        "tooltip": line.toolTip(),
        "width": line.width(),
        "text_width": line.fontMetrics().horizontalAdvance(line.shown),
    }
    s.grab("docker-disconnected")


def phase_dialog(s: Session) -> Any:
    ctx, panel, controller = s.ctx, s.panel, s.controller
    dialog = panel.dialog
    out: dict[str, Any] = {}
    set_endpoint(s, s.p["good_endpoint"])
    yield from until(ctx, lambda: controller.client.is_connected, 30, "the docker to connect")
    click(panel.settings_button)
    yield 200
    out["backend_connected"] = dialog.backend_info.text()
    out["repair_enabled"] = dialog.setup.repair_button.isEnabled()
    saved = controller.settings.endpoint
    type_into(dialog.endpoint, "localhost:5588", enter=True)  # no scheme: OK disabled, Enter does nothing
    yield 100
    out["invalid"] = {
        "ok_enabled": dialog.ok_button.isEnabled(),
        "problem": dialog.problem.text() if dialog.problem.isVisible() else "",
        "still_open": dialog.isVisible(),
        "saved": controller.settings.endpoint,
    }
    path = ctx.artifact_path("dialog-invalid")
    if path is not None and dialog.grab().save(str(path), "PNG"):
        ctx.files.append(str(path))
    click(dialog.cancel_button)
    yield 100
    out["after_cancel"] = {"open": dialog.isVisible(), "saved": controller.settings.endpoint}
    click(panel.settings_button)
    yield 100
    out["reopened_field"] = dialog.endpoint.text()
    type_into(dialog.endpoint, s.p["dead_endpoint"])
    click(dialog.apply_button)  # Apply: saved, the dialog stays, the Backend row follows
    yield from until(ctx, lambda: not controller.client.is_connected, 10, "the docker to leave the backend")
    yield 100
    out["backend_after_apply"] = dialog.backend_info.text()
    out["open_after_apply"] = dialog.isVisible()
    click(dialog.cancel_button)
    out["saved_first"] = saved
    s.out["dialog"] = out


def phase_kept(s: Session) -> Any:
    ctx, panel, controller, app = s.ctx, s.panel, s.controller, s.app
    if controller.client.is_connected:
        set_endpoint(s, s.p["dead_endpoint"])
    other = ctx.new_document(200, 150, "closed-before-result")
    other_layer = ctx.add_paint_layer(other, "Paint", pattern(200, 150))
    other.setActiveNode(other_layer)
    yield 300
    click(panel.refine_button)
    job = controller.jobs.current()
    other.setModified(False)
    other.close()
    show(app, s.doc)
    yield 300
    set_endpoint(s, s.p["good_endpoint"])
    yield from until(ctx, lambda: controller.history.get(job.id), s.p.get("timeout_s", 60), "the kept result")
    kept = controller.history.get(job.id)
    out: dict[str, Any] = {"applied": kept.applied, "note": kept.note}
    out["message"] = next((t for t in s.messages() if "kept in the history" in t), None)
    yield 100
    row = panel.history.result_rows[job.id]
    before = s.ids()
    click(row.apply_button)
    yield 200
    out["apply"] = [n.name() for n in s.new_layers(before)]
    documents = len(app.documents())
    click(row.open_button)
    yield from until(ctx, lambda: len(app.documents()) > documents, 10, "the result opened as a document")
    opened = app.activeDocument()
    out["open"] = {"size": [opened.width(), opened.height()], "layers": [n.name() for n in opened.topLevelNodes()]}
    opened.setModified(False)
    show(app, s.doc)
    try:  # applied here: the row is shown with this document
        yield from until(ctx, lambda: job.id in panel.history.result_rows, 5, "the result's row in this document")
    except TimeoutError as exc:
        view = panel.history.document_of_view()
        raise AssertionError(
            f"{exc}: the view shows {view and view.name()!r}, the result belongs to "
            f"{[d.name() if d else None for d in (kept.target.document, *kept.documents)]}, active document "
            f"{app.activeDocument() and app.activeDocument().name()!r}, equal: "
            f"{[d == view for d in kept.documents]}"
        ) from None
    yield 100  # a new row is shown by a queued event
    row = panel.history.result_rows[job.id]
    click(row.discard_button)
    yield 100
    out["row_after_discard"] = job.id in panel.history.result_rows
    s.out["kept"] = out


def phase_big(s: Session) -> Any:
    ctx, panel, controller, app = s.ctx, s.panel, s.controller, s.app
    if not controller.client.is_connected:
        set_endpoint(s, s.p["good_endpoint"])
        yield from until(ctx, lambda: controller.client.is_connected, 30, "the docker to connect")
    width, height = BIG
    doc = ctx.new_document(width, height, "big-e2e")
    layer = doc.createNode("Big", "paintlayer")
    doc.rootNode().addChildNode(layer, None)
    layer.setPixelData(bytes((40, 90, 160, 255)) * (width * height), 0, 0, width, height)
    doc.setActiveNode(layer)
    doc.waitForDone()
    yield 2000  # let Krita draw the new document
    idle = Ticker(s.p.get("tick_ms", 10))
    idle.start()
    yield 1000
    idle_ui = idle.stop()
    probe = Probe()
    wrapped = (
        (controller.adapter, "capture", "capture (geometry)"),
        (controller, "_on_read", "read done"),
        (controller, "_submit", "submit"),
        (controller.client, "send", "encode and send"),
        (panel.history, "update_jobs", "queue view"),
    )
    for obj, name, label in wrapped:
        if hasattr(obj, name):  # (older versions of the plugin, measured with this scenario, lack some)
            probe.wrap(obj, name, label)
    reads = ReadRecorder()
    handler: list[float] = []  # released, then clicked after the plugin's own slot: the Run handler's time
    button = panel.refine_button
    for signal in (button.released, button.clicked):
        signal.connect(lambda *_args: handler.append(time.perf_counter()))
    ticker = Ticker(s.p.get("tick_ms", 10))
    ticker.start()
    started = time.monotonic()
    click(button)
    click_ms = round((time.monotonic() - started) * 1000, 1)  # Krita's handling of the click, and the plugin's
    job = controller.jobs.current()
    yield from until(ctx, lambda: job.state.value not in ("reading", "waiting"), 60, "the 6000x4000 job to be sent")
    sent_s = time.monotonic() - started
    yield 300
    ui = ticker.stop()
    worst = {}
    for label, _t, d in probe.records:
        worst[label] = max(worst.get(label, 0.0), round(d * 1000, 1))
    click(panel.cancel_button)
    yield from until(ctx, lambda: job.state.finished, 60, "the 6000x4000 job to be cancelled")
    read_records = reads.stop()
    for obj, name, _label in wrapped:
        if name in vars(obj):
            delattr(obj, name)  # the probe's wrappers (instance attributes) go
    s.out["big"] = {
        "state": job.state.value,
        "sent_s": round(sent_s, 2),
        "max_gap_ms": ui["max_gap_ms"],
        "top_gaps_ms": ui["top_gaps_ms"],
        "idle_max_gap_ms": idle_ui["max_gap_ms"],
        "plugin_worst_ms": {"Run handler": round((handler[-1] - handler[0]) * 1000, 1), **worst},
        "click_ms": click_ms,
        "reads": read_records,  # [on the UI thread, pixels, ms] of every projectionPixelData call
        "size": list(BIG),
    }
    doc.setModified(False)
    doc.close()
    show(app, s.doc)
    yield 500


def phase_local(s: Session) -> Any:
    ctx, panel, controller = s.ctx, s.panel, s.controller
    dialog = panel.dialog
    if not dialog.isVisible():
        click(panel.settings_button)
    type_into(dialog.backend_command, s.p["python"])
    type_into(dialog.backend_args, s.p["backend_args"])
    type_into(dialog.endpoint, s.p["local_endpoint"], enter=True)  # Enter: OK, every field saved
    if dialog.isVisible() or controller.settings.backend_command != s.p["python"]:
        raise AssertionError("Enter did not save the local backend's settings and close the dialog")
    panel.strength.setValue(100)
    panel.advanced.steps.setValue(s.p.get("slow_steps", 40))
    yield 100
    out: dict[str, Any] = {}
    click(panel.backend_button)  # "Start backend"
    yield from backend_up(s, "the docker's own backend to start")
    out["started"] = panel.backend_button.text()
    s.doc.setActiveNode(s.source)  # the active layer is a result layer now; refine the painting
    yield 100
    before = s.ids()
    click(panel.refine_button)
    yield from until(ctx, lambda: controller.jobs.current().step > 0, 60, "the job to run on the local backend")
    click(panel.backend_button)  # "Stop backend", mid-job
    yield from until(ctx, lambda: controller.backend.state.value == "stopped", 60, "the backend to stop")
    # A service that stops within its grace says "cancelled: shutdown" (the job is lost at once); one busy
    # in a long step on a loaded machine is killed, and the next service's status says the job is gone.
    yield 500
    out["lost_at_stop"] = bool(controller.jobs.lost())
    click(panel.backend_button)  # "Start backend" again
    yield from backend_up(s, "the backend to start again")
    yield from until(ctx, lambda: controller.jobs.lost(), 60, "the job to be lost")
    yield 100
    lost = controller.jobs.lost()[0]
    out["lost"] = lost.status_text
    out["lost_seed"] = lost.seed
    out["resubmit_visible"] = panel.resubmit_button.isVisible()
    known = {e.id for e in controller.history}
    click(panel.resubmit_button)

    def kept() -> list[Any]:
        return [e for e in controller.history if e.id not in known]

    # Krita runs the event loop inside addChildNode: this check can run after the layer is there and
    # before the controller has put its result in the history, so it waits for both.
    yield from until(ctx, lambda: s.new_layers(before) and kept(), 120, "the resubmitted job's layer")
    out["layers"] = [n.name() for n in s.new_layers(before)]
    out["resubmitted_seed"] = kept()[0].seed
    click(panel.backend_button)  # "Stop backend"
    yield from until(ctx, lambda: controller.backend.state.value == "stopped", 30, "the backend to stop")
    s.out["local"] = out


class ReadRecorder:
    """Record every ``Node.projectionPixelData`` call (the plugin's own, through Krita's class): on which
    thread, how many pixels, how long; ``stop()`` puts the method back and returns the records."""

    def __init__(self) -> None:
        import threading

        from krita import Node  # type: ignore[import-not-found]

        self.node, self.original, self.records = Node, Node.projectionPixelData, []
        import inspect

        self.saved = inspect.getattr_static(Node, "projectionPixelData")  # the raw descriptor: put back as it was
        ui = threading.get_ident()
        original, records = self.original, self.records

        def recorded(node: Any, x: int, y: int, w: int, h: int) -> Any:
            start = time.perf_counter()
            try:
                return original(node, x, y, w, h)
            finally:
                records.append([threading.get_ident() == ui, w * h, round((time.perf_counter() - start) * 1000, 1)])

        Node.projectionPixelData = recorded

    def stop(self) -> list[list[Any]]:
        self.node.projectionPixelData = self.saved  # (the unbound method set back would not bind the node)
        return self.records


def backend_up(s: Session, what: str) -> Any:
    controller = s.controller
    try:
        yield from until(s.ctx, lambda: controller.client.is_connected, 150, what)
    except TimeoutError as exc:
        raise TimeoutError(
            f"{exc}; backend {controller.backend.state.value}: {controller.backend.detail}; connection "
            f"{controller.client.state.value}: {controller.client.detail}; log:\n{controller.backend.log_tail()}"
        ) from None


# --- helpers ------------------------------------------------------------------------------------------


def layout(s: Session) -> dict[str, Any]:
    from PyQt5.QtGui import QGuiApplication  # type: ignore[import-not-found]
    from PyQt5.QtWidgets import QScrollArea  # type: ignore[import-not-found]

    docker, panel = s.docker, s.panel
    screen = QGuiApplication.primaryScreen().geometry()
    top_left = docker.mapToGlobal(docker.rect().topLeft())
    window = s.app.activeWindow().qwindow()
    frame = window.frameGeometry()
    status = window.statusBar()
    return {
        "window": [frame.x(), frame.y(), frame.width(), frame.height()],
        "window_min": [window.minimumSizeHint().width(), window.minimumSizeHint().height()],
        "status_bar": status is not None and status.isVisible(),
        "status_bottom": status.mapToGlobal(status.rect().bottomLeft()).y() if status is not None else None,
        "docker_min": [docker.minimumSizeHint().width(), docker.minimumSizeHint().height()],
        "scrolls": panel.findChild(QScrollArea).verticalScrollBar().maximum() > 0,
        "screen": [screen.width(), screen.height()],
        "docker": [top_left.x(), top_left.y(), docker.width(), docker.height()],
        "floating": docker.isFloating(),
        "panel_min": [panel.minimumSizeHint().width(), panel.minimumSizeHint().height()],
        "panel_size": [panel.width(), panel.height()],
        "history_height": panel.history.height(),
        "connection_bottom": panel.connection.mapToGlobal(panel.connection.rect().bottomLeft()).y(),
        "advanced_field_width": panel.advanced.steps.sizeHint().width(),
        "visible_dockers": sorted(d.windowTitle() for d in s.app.dockers() if d.isVisible()),
    }


def repaint_ms(panel: Any) -> list[float]:
    """How long a full, synchronous repaint of the docker's content takes (three tries)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        panel.repaint()
        times.append(round((time.perf_counter() - start) * 1000, 1))
    return times


def describe_layer(ctx: Any, layer: Any, below: Any) -> dict[str, Any]:
    siblings = [ctx.node_id(n) for n in layer.parentNode().childNodes()]
    b = layer.bounds()
    below_id = ctx.node_id(below)
    return {
        "name": layer.name(),
        "bounds": [b.x(), b.y(), b.width(), b.height()],
        "directly_above": below_id in siblings and siblings.index(ctx.node_id(layer)) == siblings.index(below_id) + 1,
        "visible": layer.visible(),
    }


def alpha_check(layer: Any, x: int, y: int, w: int, h: int) -> dict[str, Any]:
    alpha = bytes(layer.pixelData(0, 0, W, H))[3::4]
    x1, y1 = min(W, x + w), min(H, y + h)
    outside = sum(1 for r in range(H) for c in range(W) if alpha[r * W + c] and not (x <= c < x1 and y <= r < y1))
    margin = 24
    inner = [alpha[r * W + c] for r in range(y + margin, y1 - margin) for c in range(x + margin, x1 - margin)]
    return {"outside_nonzero": outside, "inner_min": min(inner) if inner else None}


def show(app: Any, doc: Any) -> None:
    """Bring ``doc``'s view to the front (``View.setVisible``; ``Window.showView`` does not switch in 5.1)."""
    for view in app.activeWindow().views():
        if view.document() == doc:
            view.setVisible()
    app.setActiveDocument(doc)
