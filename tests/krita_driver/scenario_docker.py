"""E2E inside real Krita: the SDXL Refiner docker used as an artist uses it, every control clicked
with the mouse (QTest) on the docker's own widgets, against real backends.

1. measure: a 640x480 8-bit document, a selection partly off the canvas, the prompt typed, Refine
   clicked; a new layer appears. A 10 ms QTimer runs meanwhile (its largest gap = how long Krita's
   UI thread was blocked) and a probe times the plugin's own work on that thread. Screenshots before
   and after, of the screen and of the docker.
2. again: "Again" on the result: a second layer from the same captured pixels, stacked above the
   first (the result layer is the active one now). A screenshot while it runs.
3. queue: the endpoint typed in the settings dialog points nowhere; two jobs wait; one row's Cancel,
   then the Cancel button.
4. kept: a job of a second document, which is closed before the backend is back: its result is kept
   in the history; Apply (to the shown document), Open (as a new document), Discard.
5. local backend: Start backend (the docker runs ``python -m krita_sdxl.backend.cli serve --demo``),
   Refine, Stop backend while the job runs (the job is lost, not cancelled), Start again, Resubmit:
   the layer appears.

params: rect [x, y, w, h], prompt, good_endpoint, dead_endpoint, local_endpoint, python, backend_args,
timeout_s, tick_ms, settle_ms
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


def run(ctx: Any) -> Any:
    p = ctx.params
    app = ctx.app
    docker = find_docker(app)
    docker.show()
    docker.raise_()
    panel = docker.widget()
    controller = panel.controller
    out: dict[str, Any] = {}

    doc = ctx.new_document(W, H, "docker-e2e")
    data = pattern(W, H)
    source = ctx.add_paint_layer(doc, "Source", data)
    doc.setActiveNode(source)
    x, y, w, h = p["rect"]
    ctx.select_rect(doc, x, y, w, h)
    doc.refreshProjection()
    yield from until(ctx, lambda: controller.client.is_connected, 60, "the docker to connect to the backend")
    yield 500  # let the window, the views and the docker settle
    doc.waitForDone()
    out["layout"] = layout(app, docker, panel)

    # --- 1. measure ------------------------------------------------------------------------------
    type_into(panel.prompt, p["prompt"])
    if controller.settings.prompt != p["prompt"]:
        raise AssertionError(f"typed {p['prompt']!r}, the settings hold {controller.settings.prompt!r}")
    yield 300  # screenshots block Krita's UI thread: let it paint first
    ctx.screenshot("before")
    grab(ctx, docker, "docker-before")
    before = ids(ctx, doc)
    probe = Probe()
    probe.wrap(controller.adapter, "capture")
    probe.wrap(controller.adapter, "apply")
    probe.wrap(controller.client, "_handle", "message")
    probe.wrap(controller, "_thumbnail", "thumbnail")
    probe.wrap(panel.history, "update_results", "history view")
    probe.wrap(panel.history, "update_jobs", "queue view")
    ticker = Ticker(p.get("tick_ms", 10))
    ticker.start()
    started = time.monotonic()
    click(panel.refine_button)
    waited = yield from until(ctx, lambda: new_layers(ctx, doc, before), p.get("timeout_s", 60), "the result layer")
    yield p.get("settle_ms", 750)
    ui = ticker.stop()
    ui["probe_slow_ms"] = probe.slow()
    ui["probe_worst_ms"] = {
        label: round(max(d for lb, _t, d in probe.records if lb == label) * 1000, 1)
        for label in {lb for lb, _t, _d in probe.records}
    }
    (first,) = new_layers(ctx, doc, before)
    out["measure"] = {"time_to_layer_s": round(waited, 3), "total_s": round(time.monotonic() - started, 3), "ui": ui}
    out["first"] = describe_layer(ctx, first, source)
    out["first"]["alpha"] = alpha_check(first, x, y, w, h)
    out["source_unchanged"] = (
        hashlib.sha256(bytes(source.pixelData(0, 0, W, H))).digest() == hashlib.sha256(data).digest()
    )
    out["active_after_refine"] = doc.activeNode().name() if doc.activeNode() else None
    entry = controller.history.newest_first()[0]
    row = panel.history.result_rows[entry.id]
    out["first_row"] = {
        "title": row.title.text(),
        "detail": row.detail.text(),
        "thumbnail": bool(row.thumb.pixmap() and not row.thumb.pixmap().isNull()),
    }
    out["messages_after_refine"] = [text for _level, text in panel.messages.entries]
    ctx.log(f"measure: {out['measure']}")
    yield 300
    ctx.screenshot("after")
    grab(ctx, docker, "docker-after")

    # --- 2. again with a new seed ------------------------------------------------------------------
    before = ids(ctx, doc)
    captures = sum(1 for label, _t, _d in probe.records if label == "capture")
    click(row.again_button)
    yield from until(ctx, lambda: panel.history.job_rows, 10, "the Again job in the queue")
    yield from until(
        ctx, lambda: new_layers(ctx, doc, before) or controller.jobs.current().step > 0, 60, "the Again job to run"
    )
    grab(ctx, docker, "docker-during")
    yield from until(ctx, lambda: new_layers(ctx, doc, before), p.get("timeout_s", 60), "the Again layer")
    (second,) = new_layers(ctx, doc, before)
    out["again"] = describe_layer(ctx, second, first)
    out["again"]["captures"] = sum(1 for label, _t, _d in probe.records if label == "capture") - captures

    # --- 3. the queue: per-job cancel and Cancel, with no backend ---------------------------------------
    click(panel.settings_button)
    type_into(panel.dialog.endpoint, p["dead_endpoint"], enter=True)
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
    click(panel.cancel_button)
    yield 50
    out["queue"] = {"after_row_cancel": one, "after_cancel": [waiting[0].state.value, waiting[1].state.value]}
    out["queue"]["rows_left"] = len(panel.history.job_rows)

    # --- 4. a result kept for a closed document: Apply, Open, Discard --------------------------------
    other = ctx.new_document(200, 150, "closed-before-result")
    other_layer = ctx.add_paint_layer(other, "Paint", pattern(200, 150))
    other.setActiveNode(other_layer)
    yield 300
    click(panel.refine_button)
    job = controller.jobs.current()
    other.setModified(False)
    other.close()
    show(app, doc)
    yield 300
    type_into(panel.dialog.endpoint, p["good_endpoint"], enter=True)
    yield from until(ctx, lambda: controller.history.get(job.id), p.get("timeout_s", 60), "the kept result")
    kept = controller.history.get(job.id)
    out["kept"] = {"applied": kept.applied, "note": kept.note}
    out["kept"]["message"] = next((t for _lv, t in panel.messages.entries if "kept in the history" in t), None)
    yield 100
    kept_row = panel.history.result_rows[job.id]
    before = ids(ctx, doc)
    click(kept_row.apply_button)
    yield 200
    applied = new_layers(ctx, doc, before)
    out["kept"]["apply"] = [n.name() for n in applied]
    documents = len(app.documents())
    click(kept_row.open_button)
    yield from until(ctx, lambda: len(app.documents()) > documents, 10, "the result opened as a document")
    opened = app.activeDocument()
    out["kept"]["open"] = {
        "size": [opened.width(), opened.height()],
        "layers": [n.name() for n in opened.topLevelNodes()],
    }
    opened.setModified(False)
    show(app, doc)
    click(kept_row.discard_button)
    yield 100
    out["kept"]["rows_after_discard"] = job.id in panel.history.result_rows

    # --- 5. Start/Stop backend and Resubmit ----------------------------------------------------------
    dialog = panel.dialog
    type_into(dialog.backend_command, p["python"])
    type_into(dialog.backend_args, p["backend_args"])
    type_into(dialog.endpoint, p["local_endpoint"], enter=True)
    dialog.close()
    panel.strength.setValue(100)
    panel.advanced.steps.setValue(p.get("slow_steps", 40))
    yield 100
    click(panel.backend_button)  # "Start backend"
    yield from until(ctx, lambda: controller.client.is_connected, 150, "the docker's own backend to start")
    out["local"] = {"started": panel.backend_button.text()}
    before = ids(ctx, doc)
    click(panel.refine_button)
    yield from until(ctx, lambda: controller.jobs.current().step > 0, 60, "the job to run on the local backend")
    click(panel.backend_button)  # "Stop backend", mid-job
    yield from until(ctx, lambda: controller.jobs.lost(), 30, "the job to be lost when the backend stops")
    yield from until(ctx, lambda: controller.backend.state.value == "stopped", 30, "the backend to stop")
    out["local"]["lost"] = controller.jobs.lost()[0].status_text
    out["local"]["resubmit_visible"] = panel.resubmit_button.isVisible()
    click(panel.backend_button)  # "Start backend" again
    yield from until(ctx, lambda: controller.client.is_connected, 150, "the backend to start again")
    click(panel.resubmit_button)
    yield from until(ctx, lambda: new_layers(ctx, doc, before), 120, "the resubmitted job's layer")
    out["local"]["layers"] = [n.name() for n in new_layers(ctx, doc, before)]
    click(panel.backend_button)  # "Stop backend"
    yield from until(ctx, lambda: controller.backend.state.value == "stopped", 30, "the backend to stop")
    out["messages"] = [f"{level}: {text}" for level, text in panel.messages.entries]
    out["internal_errors"] = [t for _lv, t in panel.messages.entries if "Internal error" in t]
    grab(ctx, docker, "docker-end")
    return out


# --- helpers ------------------------------------------------------------------------------------------


def layout(app: Any, docker: Any, panel: Any) -> dict[str, Any]:
    from PyQt5.QtGui import QGuiApplication  # type: ignore[import-not-found]

    screen = QGuiApplication.primaryScreen().geometry()
    top_left = docker.mapToGlobal(docker.rect().topLeft())
    bottom = panel.history.mapToGlobal(panel.history.rect().bottomLeft()).y()
    return {
        "screen": [screen.width(), screen.height()],
        "docker": [top_left.x(), top_left.y(), docker.width(), docker.height()],
        "floating": docker.isFloating(),
        "panel_min": [panel.minimumSizeHint().width(), panel.minimumSizeHint().height()],
        "panel_size": [panel.width(), panel.height()],
        "history_height": panel.history.height(),
        "connection_bottom": panel.connection.mapToGlobal(panel.connection.rect().bottomLeft()).y(),
        "history_bottom": bottom,
        "advanced_field_width": panel.advanced.steps.sizeHint().width(),
        "docks_right": sorted(d.windowTitle() for d in app.dockers() if d.isVisible()),
    }


def grab(ctx: Any, docker: Any, label: str) -> None:
    path = ctx.artifact_path(label)
    if path is not None and docker.grab().save(str(path), "PNG"):
        ctx.files.append(str(path))


def ids(ctx: Any, doc: Any) -> set[str]:
    return {ctx.node_id(n) for n in ctx.all_nodes(doc)}


def new_layers(ctx: Any, doc: Any, before: set[str]) -> list[Any]:
    return [
        n
        for n in ctx.all_nodes(doc)
        if ctx.node_id(n) not in before and n.type().endswith("layer") and not n.bounds().isEmpty()
    ]


def describe_layer(ctx: Any, layer: Any, below: Any) -> dict[str, Any]:
    parent = layer.parentNode()
    siblings = [ctx.node_id(n) for n in parent.childNodes()]
    b = layer.bounds()
    return {
        "name": layer.name(),
        "bounds": [b.x(), b.y(), b.width(), b.height()],
        "directly_above": siblings.index(ctx.node_id(layer)) == siblings.index(ctx.node_id(below)) + 1
        if ctx.node_id(below) in siblings
        else False,
        "visible": layer.visible(),
    }


def alpha_check(layer: Any, x: int, y: int, w: int, h: int) -> dict[str, Any]:
    pixels = bytes(layer.pixelData(0, 0, W, H))
    alpha = pixels[3::4]
    x1, y1 = min(W, x + w), min(H, y + h)
    outside = sum(1 for r in range(H) for c in range(W) if alpha[r * W + c] and not (x <= c < x1 and y <= r < y1))
    margin = 24
    inner = [alpha[r * W + c] for r in range(y + margin, y1 - margin) for c in range(x + margin, x1 - margin)]
    return {"outside_nonzero": outside, "inner_min": min(inner) if inner else None}


def show(app: Any, doc: Any) -> None:
    window = app.activeWindow()
    for view in window.views():
        if view.document() == doc:
            window.showView(view)
    app.setActiveDocument(doc)
