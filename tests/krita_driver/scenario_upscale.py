"""E2E inside real Krita: the docker's Upscale mode, clicked as an artist clicks it, against a demo backend.

A 512x384 RGBA/U8 document with an opaque patterned paint layer "Source" (active), no selection:

new: mode Upscale, factor 2x, New document; Run clicked: a 1024x768 document opens with the
   result as its layer; the source document keeps its size, its layers and Source's pixels.
scale: the source document shown again, "Scale this document"; Run clicked: the document becomes
   1024x768 (Source scaled by Krita) and the result is a new layer directly above Source.

params: width, height, timeout_s
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenario_tools import click, find_docker, pattern, until


def choose(combo: Any, value: str) -> None:
    """Pick an entry of one of the docker's combo boxes (as the keyboard or the popup would)."""
    index = combo.findData(value)
    if index < 0 or not combo.model().item(index).isEnabled():
        raise AssertionError(f"{value!r} is not offered: {[combo.itemData(i) for i in range(combo.count())]}")
    combo.setCurrentIndex(index)


def digest(layer: Any, width: int, height: int) -> str:
    return hashlib.sha256(bytes(layer.pixelData(0, 0, width, height))).hexdigest()


def show(ctx: Any, doc: Any) -> None:
    """Make ``doc`` the document shown (Krita 5.1: View.setVisible switches; Window.showView does not)."""
    window = ctx.app.activeWindow()
    for view in window.views():
        if view.document() == doc:
            view.setVisible()
    ctx.app.setActiveDocument(doc)


def run(ctx: Any) -> Any:
    p = ctx.params
    width, height = p.get("width", 512), p.get("height", 384)
    timeout = p.get("timeout_s", 120)
    app = ctx.app
    docker = find_docker(app)
    docker.show()
    docker.raise_()
    panel = docker.widget()
    controller = panel.controller
    doc = ctx.new_document(width, height, "upscale-e2e")
    data = pattern(width, height)
    source = ctx.add_paint_layer(doc, "Source", data)
    doc.setActiveNode(source)
    doc.refreshProjection()
    yield from until(ctx, lambda: "upscale" in controller.supported_modes, 60, "a backend that upscales")
    yield 500
    doc.waitForDone()
    out: dict[str, Any] = {}
    source_sha = digest(source, width, height)

    choose(panel.mode, "upscale")
    choose(panel.upscale.factor, "2")
    choose(panel.upscale.place, "new")
    yield 100
    out["button"] = panel.refine_button.text()
    known = list(app.documents())
    layers_before = [n.name() for n in doc.topLevelNodes()]
    click(panel.refine_button)

    def opened() -> list[Any]:
        return [d for d in app.documents() if all(d != k for k in known)]

    waited = yield from until(ctx, opened, timeout, "a new document")
    yield 500
    new = opened()[0]
    new.waitForDone()
    layers = [n for n in new.topLevelNodes() if n.type() == "paintlayer"]
    out["new"] = {
        "seconds": round(waited, 1),
        "size": [new.width(), new.height()],
        "layers": [[n.name(), [n.bounds().width(), n.bounds().height()]] for n in new.topLevelNodes()],
        "opaque": bool(layers) and bytes(layers[0].pixelData(0, 0, 4, 4))[3::4] == b"\xff" * 16,
        "source_size": [doc.width(), doc.height()],
        "source_layers_same": [n.name() for n in doc.topLevelNodes()] == layers_before,
        "source_unchanged": digest(source, width, height) == source_sha,
    }
    ctx.screenshot("upscale-new")

    show(ctx, doc)
    doc.setActiveNode(source)
    yield 300
    if app.activeDocument() != doc:
        raise AssertionError("the source document could not be shown again")
    choose(panel.upscale.place, "scale")
    before = {ctx.node_id(n) for n in ctx.all_nodes(doc)}
    click(panel.refine_button)

    def added() -> list[Any]:
        return [n for n in ctx.all_nodes(doc) if ctx.node_id(n) not in before and n.type() == "paintlayer"]

    waited = yield from until(ctx, lambda: added() and doc.width() == 2 * width, timeout, "the scaled document")
    yield 500
    doc.waitForDone()
    layer = added()[0]
    siblings = [ctx.node_id(n) for n in layer.parentNode().childNodes()]
    out["scale"] = {
        "seconds": round(waited, 1),
        "size": [doc.width(), doc.height()],
        "source_bounds": [source.bounds().width(), source.bounds().height()],
        "layer": layer.name(),
        "layer_bounds": [layer.bounds().x(), layer.bounds().y(), layer.bounds().width(), layer.bounds().height()],
        "directly_above": siblings.index(ctx.node_id(layer)) == siblings.index(ctx.node_id(source)) + 1,
    }
    ctx.screenshot("upscale-scaled")
    out["messages"] = [text for _level, text in panel.messages.entries]
    out["internal_errors"] = [t for t in out["messages"] if "Internal error" in t]
    return out
