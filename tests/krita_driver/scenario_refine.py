"""E2E inside real Krita: press the plugin's Refine (its action) on a selection and measure the result.

Builds a 512x512 RGBA/U8 document with an opaque patterned paint layer "Source" (active) above
Krita's white Background, selects a rectangle, triggers the action, and waits, polling from
QTimers, for one new layer with pixels. A 10 ms QTimer runs meanwhile; the largest gap between its
ticks is how long Krita's UI thread was blocked. Returns measurements; the test asserts on them.

params: width, height, rect [x0, y0, x1, y1], action, timeout_s, inner_margin, settle_ms, tick_ms, docker
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenario_tools import Ticker, pattern


def run(ctx: Any) -> Any:
    p = ctx.params
    width, height = p.get("width", 512), p.get("height", 512)
    x0, y0, x1, y1 = p.get("rect", (100, 120, 300, 260))
    margin = p.get("inner_margin", 20)
    app = ctx.app

    doc = ctx.new_document(width, height, "refine-e2e")
    data = pattern(width, height)
    source = ctx.add_paint_layer(doc, "Source", data)
    doc.setActiveNode(source)
    ctx.select_rect(doc, x0, y0, x1 - x0, y1 - y0)
    doc.refreshProjection()
    yield 300  # let the image, the views and the plugin's docker settle
    doc.waitForDone()
    if bytes(source.pixelData(0, 0, width, height)) != data:
        raise AssertionError("the Source layer does not hold the pattern just written")
    if doc.activeNode() is None or ctx.node_id(doc.activeNode()) != ctx.node_id(source):
        raise AssertionError(f"active node is {doc.activeNode() and doc.activeNode().name()}, not Source")

    dockers = sorted({d.windowTitle() for d in app.dockers()})
    action = app.action(p.get("action", "krita_sdxl_refine"))
    if action is None:
        sdxl = sorted(a.objectName() for a in app.actions() if "sdxl" in a.objectName().lower())
        raise AssertionError(f"no Krita action {p.get('action', 'krita_sdxl_refine')!r}; sdxl actions: {sdxl}")

    before = {ctx.node_id(n) for n in ctx.all_nodes(doc)}
    source_sha = hashlib.sha256(data).hexdigest()

    def new_nodes() -> list[Any]:
        return [n for n in ctx.all_nodes(doc) if ctx.node_id(n) not in before]

    def new_layer_with_pixels() -> bool:
        return any(n.type().endswith("layer") and not n.bounds().isEmpty() for n in new_nodes())

    ticker = Ticker(p.get("tick_ms", 10))
    ticker.start()
    started = time.monotonic()
    ctx.log(f"triggering {action.objectName()}")
    action.trigger()
    waited = yield from ctx.wait_for(new_layer_with_pixels, p.get("timeout_s", 60), "a new layer with pixels")
    ctx.log(f"new layer after {waited:.2f} s")
    yield p.get("settle_ms", 750)  # the plugin may still be finishing (names, undo, projection)
    ui = ticker.stop()
    doc.waitForDone()
    doc.refreshProjection()

    nodes = new_nodes()
    layers = [n for n in nodes if n.type().endswith("layer")]
    value: dict[str, Any] = {
        "time_to_layer_s": round(waited, 3),
        "total_s": round(time.monotonic() - started, 3),
        "ui": ui,
        "dockers": dockers,
        "new_nodes": [[n.name(), n.type()] for n in nodes],
        "top_level": [[n.name(), n.type()] for n in doc.topLevelNodes()],
        "source_unchanged": hashlib.sha256(bytes(source.pixelData(0, 0, width, height))).hexdigest() == source_sha,
        "source_name": source.name(),
        "modules": {
            name: getattr(sys.modules.get(name), "__file__", None)
            for name in ("krita_sdxl_refiner", "krita_sdxl.protocol", "zmq", "msgpack")
        },
    }
    if len(layers) != 1:
        return value

    layer = layers[0]
    parent, source_parent = layer.parentNode(), source.parentNode()
    siblings = [ctx.node_id(n) for n in (parent.childNodes() if parent is not None else [])]
    value["layer"] = {
        "name": layer.name(),
        "type": layer.type(),
        "bounds": [layer.bounds().x(), layer.bounds().y(), layer.bounds().width(), layer.bounds().height()],
        "same_parent": parent is not None
        and source_parent is not None
        and ctx.node_id(parent) == ctx.node_id(source_parent),
        "index": siblings.index(ctx.node_id(layer)) if ctx.node_id(layer) in siblings else None,
        "source_index": siblings.index(ctx.node_id(source)) if ctx.node_id(source) in siblings else None,
        "visible": layer.visible(),
        "opacity": layer.opacity(),
    }
    pixels = bytes(layer.pixelData(0, 0, width, height))
    alpha = pixels[3::4]
    outside = [alpha[r * width + c] for r in range(height) for c in range(width) if not (x0 <= c < x1 and y0 <= r < y1)]
    inner = [alpha[r * width + c] for r in range(y0 + margin, y1 - margin) for c in range(x0 + margin, x1 - margin)]
    inside = [alpha[r * width + c] for r in range(y0, y1) for c in range(x0, x1)]
    value["alpha"] = {
        "outside_max": max(outside),
        "outside_nonzero": sum(a > 0 for a in outside),
        "inner_min": min(inner),
        "inner_zero": sum(a == 0 for a in inner),
        "inside_mean": round(sum(inside) / len(inside), 1),
    }
    # How far the result's colours are from the source inside the inner rectangle (0: a copy).
    diffs = [
        abs(pixels[(r * width + c) * 4 + k] - data[(r * width + c) * 4 + k])
        for r in range(y0 + margin, y1 - margin, 4)
        for c in range(x0 + margin, x1 - margin, 4)
        for k in range(3)
    ]
    value["inner_mean_abs_diff"] = round(sum(diffs) / len(diffs), 2)
    ctx.save_bgra_png("layer", pixels, width, height)
    ctx.screenshot("screen")
    return value
