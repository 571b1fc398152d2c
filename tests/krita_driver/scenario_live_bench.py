"""Benchmark inside real Krita: live refine's own cost on Krita's UI thread (tests/benchmarks/bench_live.py).

1. measure: a SIZE x SIZE document, Source: Layer, Live on; ``strokes`` strokes (one write each, then a wait
   for the preview), then ``mouse_strokes`` real brush strokes with the mouse on Krita's canvas. Per
   update: stroke end -> job sent, minus the wait (the change seen, capture, encode, send); capture ->
   sent; result received (the client's socket read) -> preview shown (decode, ``setPixelData``, redraw).
   A 10 ms timer gives the UI thread's largest stall; a probe times the plugin's own calls on it.
2. soak: ``updates`` more updates as fast as they come: Krita's memory (VmRSS), the layer count and the undo
   stack (Krita's Undo History docker) before and after.
3. detect: one check of the change detection on a DETECT x DETECT layer, Source: Layer and Source: Image,
   unchanged (the worst case: every byte compared) and changed.

params: size, strokes, updates, detect, timeout_s
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenario_live import mouse_stroke, previews, undo_rows
from scenario_tools import Probe, Ticker, click, find_docker, pattern, until


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stats(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    if not ms:
        return {}
    return {"median_ms": round(statistics.median(ms), 2), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2),
            "max_ms": round(ms[-1], 2), "n": len(ms)}  # fmt: skip


def run(ctx: Any) -> Any:
    p = ctx.params
    size = p.get("size", 1024)
    docker = find_docker(ctx.app)
    docker.show()
    panel = docker.widget()
    controller = panel.controller
    live = controller.live
    doc = ctx.new_document(size, size, "live-bench")
    source = ctx.add_paint_layer(doc, "Source", pattern(size, size))
    doc.setActiveNode(source)
    doc.refreshProjection()
    yield from until(ctx, lambda: controller.client.is_connected, 60, "the docker to connect")
    yield 500
    out: dict[str, Any] = {"size": size, "wait_ms": controller.settings.live_wait_ms}
    received: dict[str, float] = {}
    on_event = live._on_event

    def timed_event(job: Any, msg: Any) -> None:
        if msg.type == "result":
            received[job.job.id] = controller.client._last_received  # set as the client read the frames
        on_event(job, msg)

    live._on_event = timed_event
    probe = Probe()
    probe.wrap(live, "_tick", "tick")
    probe.wrap(controller.client, "_handle", "message")
    probe.wrap(live.port, "capture", "capture")  # inside the tick: the port's read of the picture
    probe.wrap(live.port, "show", "show")  # inside the message: setPixelData and Krita's redraw
    probe.wrap(controller.client, "send", "send")  # encode and queue the submit
    live_module = sys.modules[type(live).__module__]
    probe.wrap(live_module, "any_visible", "any_visible")
    click(panel.live.toggle)
    yield from until(ctx, lambda: live.latency is not None, p.get("timeout_s", 120), "the first preview")
    wait_s = controller.settings.live_wait_ms / 1000

    def shown_after(t: float) -> bool:
        return bool(live.timeline) and live.timeline[-1]["fired"] > t and not live._jobs and not live._still.pending

    # --- 1. per-update overheads --------------------------------------------------------------
    ticker = Ticker(10)
    ticker.start()
    probe.records.clear()
    send, capture, show, total, seen, late = [], [], [], [], [], []
    for i in range(p.get("strokes", 30)):
        x, y = (37 * i) % (size - 20), (53 * i) % (size - 20)
        source.setPixelData(bytes((i & 255, 80, 200, 255)) * 400, x, y, 20, 20)
        ended = time.monotonic()
        yield from until(ctx, lambda ended=ended: shown_after(ended), p.get("timeout_s", 120), f"preview {i}")
        t = live.timeline[-1]
        send.append(t["sent"] - ended - wait_s)
        capture.append(t["sent"] - t["fired"])
        seen.append(t["changed"] - ended)
        late.append(t["fired"] - t["changed"] - wait_s)
        show.append(t["shown"] - received.get(t["job"], t["result"]))
        total.append(t["shown"] - ended)
        yield 50
    # the same with real brush strokes (the mouse on Krita's canvas): Krita's undo signal says when one ends
    m_send, m_seen, m_total = [], [], []
    for i in range(p.get("mouse_strokes", 15)):
        ended = yield from mouse_stroke(ctx.app, 40 + 7 * i, 25 - 3 * i)
        yield from until(ctx, lambda ended=ended: shown_after(ended), p.get("timeout_s", 120), f"brush preview {i}")
        t = live.timeline[-1]
        m_send.append(t["sent"] - ended - wait_s)
        m_seen.append(t["changed"] - ended)
        m_total.append(t["shown"] - ended)
        yield 50
    out["brush"] = {"stroke_end_to_sent_minus_wait": stats(m_send), "change_seen_after": stats(m_seen),
                    "stroke_end_to_shown": stats(m_total)}  # fmt: skip
    ui = ticker.stop()
    out["stroke_end_to_sent_minus_wait"] = stats(send)
    out["capture_encode_send"] = stats(capture)
    out["change_seen_after"] = stats(seen)
    out["fired_after_the_wait"] = stats(late)
    out["result_received_to_shown"] = stats(show)
    out["stroke_end_to_shown"] = stats(total)
    out["ui"] = ui
    out["plugin_calls_on_ui_thread"] = {
        label: stats([d for lab, _t, d in probe.records if lab == label])
        for label in ("tick", "message", "capture", "any_visible", "send", "show")
    }

    # --- 2. soak ----------------------------------------------------------------------------------
    n = p.get("updates", 500)
    before = {"rss_kib": rss_kib(), "layers": len(ctx.all_nodes(doc)), "undo": undo_rows(ctx.app),
              "previews": len(previews(ctx, doc))}  # fmt: skip
    started = time.monotonic()
    for i in range(n):
        source.setPixelData(bytes((i & 255, i * 7 & 255, 30, 255)) * 64, (i * 11) % (size - 8), (i * 29) % (size - 8),
                            8, 8)  # fmt: skip
        ended = time.monotonic()
        yield from until(ctx, lambda ended=ended: shown_after(ended), p.get("timeout_s", 120), f"update {i}")
        if i == n // 2:
            out["soak_mid_rss_kib"] = rss_kib()
    after = {"rss_kib": rss_kib(), "layers": len(ctx.all_nodes(doc)), "undo": undo_rows(ctx.app),
             "previews": len(previews(ctx, doc))}  # fmt: skip
    out["soak"] = {"updates": n, "seconds": round(time.monotonic() - started, 1), "before": before, "after": after,
                   "superseded": live.superseded}  # fmt: skip
    click(panel.live.toggle)
    yield 300

    # --- 3. change detection at DETECT x DETECT ---------------------------------------------------
    big = p.get("detect", 2048)
    doc2 = ctx.new_document(big, big, "live-detect")
    layer = ctx.add_paint_layer(doc2, "Source", pattern(big, big))
    doc2.setActiveNode(layer)
    doc2.refreshProjection()
    yield 500
    from krita_sdxl_refiner.core.live_watch import Watch, watched_box

    port = live.port
    detect: dict[str, Any] = {"size": big}
    for source_kind in ("layer", "canvas"):
        session = port.start(source_kind)
        yield 300
        watch = Watch()

        def check(session: Any = session, watch: Watch = watch) -> bool:
            shape = port.shape(session)
            box = watched_box(shape.canvas, shape.selection, 0.06)
            return watch.check(shape, box, lambda b: port.read(session, b))

        check()
        same, changed, seen = [], [], []
        for i in range(30):
            t = time.perf_counter()
            check()
            same.append(time.perf_counter() - t)
            layer.setPixelData(bytes((i, 1, 2, 255)), big - 1, big - 1, 1, 1)  # the last byte: compared last
            t = time.perf_counter()
            seen.append(check())
            changed.append(time.perf_counter() - t)
            yield 5
        detect[source_kind] = {"unchanged": stats(same), "changed": stats(changed), "all_seen": all(seen)}
        port.stop(session)
        yield 200
    out["detect"] = detect
    for d in (doc, doc2):
        d.setModified(False)
    return out
