"""Harness self-test inside real Krita: a document, a paint layer with known pixels, a rectangular
selection; read them back. Also reports what the harness set up: a kritarc setting, and the
plugins it installed (their Krita actions and where their modules were imported from).

params: width, height, rect [x, y, w, h], setting [group, key], actions [ids], modules [names]
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any


def pattern(width: int, height: int) -> bytes:
    """BGRA8: B = x, G = y, R = x ^ y, A = 255 - (x + y) % 256 (never fully opaque everywhere)."""
    out = bytearray(width * height * 4)
    i = 0
    for y in range(height):
        for x in range(width):
            out[i : i + 4] = bytes((x & 255, y & 255, (x ^ y) & 255, 255 - (x + y) % 256))
            i += 4
    return bytes(out)


def run(ctx: Any) -> Any:
    p = ctx.params
    width, height = p.get("width", 64), p.get("height", 48)
    x, y, w, h = p.get("rect", (10, 8, 30, 22))
    doc = ctx.new_document(width, height, "smoke")
    data = pattern(width, height)
    layer = ctx.add_paint_layer(doc, "Pattern", data)
    doc.setActiveNode(layer)
    ctx.select_rect(doc, x, y, w, h)
    doc.refreshProjection()
    yield 100  # let Krita's image update run
    doc.waitForDone()

    back = bytes(layer.pixelData(0, 0, width, height))
    sub = bytes(layer.pixelData(x, y, w, h))
    expected_sub = b"".join(data[((y + r) * width + x) * 4 : ((y + r) * width + x + w) * 4] for r in range(h))
    selection = doc.selection()
    sel_bytes = bytes(selection.pixelData(selection.x(), selection.y(), selection.width(), selection.height()))
    wide = bytes(selection.pixelData(0, 0, width, height))
    outside = [
        wide[r * width + c] for r in range(height) for c in range(width) if not (x <= c < x + w and y <= r < y + h)
    ]

    group, key = p.get("setting", ("krita_sdxl_e2e", "probe"))
    actions = {name: ctx.app.action(name) is not None for name in p.get("actions", [])}
    modules = {name: getattr(sys.modules.get(name), "__file__", None) for name in p.get("modules", [])}
    ctx.screenshot("screen")
    ctx.save_bgra_png("layer", back, width, height)
    return {
        "version": ctx.app.version(),
        "nodes": [[n.name(), n.type()] for n in doc.topLevelNodes()],
        "active": doc.activeNode().name(),
        "roundtrip_equal": back == data,
        "sha256": hashlib.sha256(back).hexdigest(),
        "expected_sha256": hashlib.sha256(data).hexdigest(),
        "sub_equal": sub == expected_sub,
        "pixel_at_rect": list(sub[:4]),
        "selection_bounds": [selection.x(), selection.y(), selection.width(), selection.height()],
        "selection_values": sorted(set(sel_bytes)),
        "selection_len": len(sel_bytes),
        "outside_max": max(outside) if outside else None,
        "setting": ctx.app.readSetting(group, key, "<unset>"),
        "actions": actions,
        "modules": modules,
    }
