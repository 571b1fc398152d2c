"""The thin adapter: with ``krita_live`` (the live preview layer), the only code (besides registering the plugin) that
calls Krita's API.

Reads: the active document's geometry, colour space, selection and pixels (``pixelData`` /
``projectionPixelData`` / ``Selection.pixelData``: raw bytes in Krita's own layout; no pixel loops
in Python). The pixels are read by the capture's ``reader``, which the workflow may run off the UI
thread (Krita's copy releases Python's lock; the artist may paint meanwhile, after ``waitForDone``).
Writes: one new paint layer per result, never the source layer. The new layer gets its pixels while
detached, then ``Node.addChildNode`` inserts it; in Krita 5.1 that runs a ``KisImageLayerAddCommand``
through the undo system, so Ctrl+Z removes the layer with its pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from krita import Document, Krita, Node, Selection  # type: ignore[import-not-found]

from krita_sdxl.protocol.geometry import Box, Extent

from ..core.document import AdapterError, Capture, NotApplied, Placed, Planner
from ..core.jobs import Target
from ..core.pixelformat import PixelFormat, UnsupportedFormat, pixel_format, transfer_of
from ..core.settings import GROUP
from .buffers import to_qbytearray

MASK_TYPES = frozenset({"selectionmask", "transparencymask", "filtermask", "transformmask", "colorizemask"})


class KritaAdapter:
    """The document port (``core.document.Adapter``) on Krita's API."""

    # --- settings store (kritarc, group "krita_sdxl") ------------------------------------------

    def read_setting(self, key: str, default: str) -> str:
        return str(Krita.instance().readSetting(GROUP, key, default))

    def write_setting(self, key: str, value: str) -> None:
        Krita.instance().writeSetting(GROUP, key, value)

    # --- reading -----------------------------------------------------------------------------

    def capture(self, source: str, planner: Planner) -> Capture:
        doc = Krita.instance().activeDocument()
        if doc is None:
            raise AdapterError("Open a document first.")
        return capture_from(doc, _source_layer(doc) if source == "layer" else None, planner, deferred=True)

    # --- writing -----------------------------------------------------------------------------

    def apply(self, target: Target, box: Box, fmt: PixelFormat, data: Any, name: str) -> Placed:
        """Insert the result directly above the topmost of the earlier results of its source that still
        exist (``target.above``), else above its source (a layer) or on top (the visible image). Raises
        :class:`NotApplied` when it cannot; then nothing changed."""
        doc: Document = target.document
        if not _is_open(doc):
            raise NotApplied("its document was closed")
        if _format_of(doc) != fmt:
            raise NotApplied("its document's colour space changed")
        root = doc.rootNode()
        anchor = _topmost(root, target.above)
        if anchor is None and target.source == "layer":
            anchor = _find_node(root, target.node_id)
            if anchor is None:
                raise NotApplied("its source layer was deleted")
        parent = anchor.parentNode() if anchor is not None else root
        layer = _insert_layer(doc, parent, anchor, name, box, data)
        return _placed(doc, layer)

    def apply_to_active(self, name: str, box: Box, fmt: PixelFormat, data: Any) -> Placed:
        doc = Krita.instance().activeDocument()
        if doc is None:
            raise AdapterError("Open a document first.")
        if _format_of(doc) != fmt:
            raise AdapterError(
                f"The active document is {doc.colorModel()}/{doc.colorDepth()}; this result is "
                f"{fmt.label}. Use “Open as document” instead."
            )
        active = doc.activeNode()
        if active is not None and active.type() in MASK_TYPES:
            active = active.parentNode()
        root = doc.rootNode()
        if active is None or active.parentNode() is None:
            layer = _insert_layer(doc, root, None, name, box, data)
        else:
            layer = _insert_layer(doc, active.parentNode(), active, name, box, data)
        return _placed(doc, layer)

    def open_as_document(self, name: str, box: Box, fmt: PixelFormat, profile: str, data: Any) -> str:
        app = Krita.instance()
        doc = app.createDocument(box.width, box.height, name, fmt.color_model, fmt.color_depth, profile, 72.0)
        if doc is None:
            raise AdapterError(f"Krita could not create a {box.width}x{box.height} {fmt.label} document.")
        root = doc.rootNode()
        placed = Box(0, 0, box.width, box.height)
        _insert_layer(doc, root, None, name, placed, data)
        for child in root.childNodes():
            if child.name() != name:
                child.remove()  # the white background createDocument adds
        window = app.activeWindow()
        if window is not None:
            window.addView(doc)
        return _doc_name(doc)

    def scale_document(self, target: Target, expected: Extent, size: Extent) -> None:
        """ "Scale this document" (an upscale): every layer scaled to ``size`` with Lanczos, one undo step.
        Raises :class:`NotApplied` (nothing changed) when the document was closed or resized meanwhile."""
        doc: Document = target.document
        if not _is_open(doc):
            raise NotApplied("its document was closed")
        if (doc.width(), doc.height()) != (expected.width, expected.height):
            raise NotApplied(f"its document is {doc.width()}x{doc.height()} now, no longer {expected}")
        doc.scaleImage(size.width, size.height, doc.resolution(), doc.resolution(), "Lanczos3")
        doc.waitForDone()

    def active_document(self) -> Any:
        return Krita.instance().activeDocument()


def capture_from(doc: Document, node: Node | None, planner: Planner, deferred: bool = False) -> Capture:
    """The pixels a job sends: ``node``'s (a layer source) or the visible image's (None), and the selection.
    With ``deferred`` the pixels are left to the capture's ``reader`` (the workflow runs it off the UI
    thread for a large layer); else they are read now (live refine's small captures)."""
    canvas = Extent(doc.width(), doc.height())
    source = "layer" if node is not None else "canvas"
    if node is not None:
        fmt = pixel_format(node.colorModel(), node.colorDepth())
        doc_fmt = pixel_format(doc.colorModel(), doc.colorDepth())
        if fmt != doc_fmt:
            raise UnsupportedFormat(
                f"The layer “{node.name()}” is {fmt.label} but the image is {doc_fmt.label}; "
                "convert the layer to the image's colour space first. Nothing was sent."
            )
        bounds = _box(node.bounds())
        description = f"layer “{node.name()}” in {_doc_name(doc)}"
    else:
        fmt = pixel_format(doc.colorModel(), doc.colorDepth())
        bounds = Box.from_extent(canvas)
        description = f"the visible image of {_doc_name(doc)}"
    profile = doc.colorProfile()
    selection = doc.selection()
    plan = planner(canvas, bounds, _selection_box(selection))
    crop = plan.crop
    doc.waitForDone()  # pending strokes would leave the projection stale
    expected = crop.width * crop.height * fmt.bytes_per_pixel

    def read() -> tuple[Any, Any | None]:
        """The pixels and the selection's mask over the crop: Krita copies them with Python's lock
        released, so this may run off the UI thread (the workflow does that for a large layer)."""
        pixels = node.projectionPixelData(*crop) if node is not None else doc.pixelData(*crop)
        if pixels is None or pixels.size() != expected:
            got = 0 if pixels is None else pixels.size()
            raise AdapterError(f"Krita returned {got} bytes for {crop}, expected {expected}.")
        mask = None
        if plan.masked:
            mask = selection.pixelData(*crop) if selection is not None else None
            if mask is None or mask.size() != crop.width * crop.height:
                raise AdapterError("Could not read the selection.")
        return pixels, mask

    target = Target(doc, node.uniqueId() if node is not None else None, source, description)
    capture = Capture(plan, fmt, profile, transfer_of(profile), None, None, target, reader=read)
    if not deferred:
        capture.read()
    return capture


# --- helpers -------------------------------------------------------------------------------------


def _insert_layer(doc: Document, parent: Node, above: Node | None, name: str, box: Box, data: Any) -> Node:
    layer = doc.createNode(name, "paintlayer")
    layer.setPixelData(to_qbytearray(data), *box)  # detached: not an undo step of its own
    parent.addChildNode(layer, above)  # one undoable "add layer" step, pixels included
    return layer


def _placed(doc: Document, layer: Node) -> Placed:
    active = Krita.instance().activeDocument()
    return Placed(layer.uniqueId(), _doc_name(doc), active is not None and active == doc, doc)


def _source_layer(doc: Document) -> Node:
    node = doc.activeNode()
    if node is not None and node.type() in MASK_TYPES:
        node = node.parentNode()  # a mask is active: refine the layer it belongs to
    if node is None or node.parentNode() is None:
        raise AdapterError("Select a layer to refine (or set the source to the visible image).")
    return node


def _box(rect: Any) -> Box:
    return Box(rect.x(), rect.y(), max(0, rect.width()), max(0, rect.height()))


def _selection_box(selection: Selection | None) -> Box | None:
    if selection is None or selection.width() <= 0 or selection.height() <= 0:
        return None
    return Box(selection.x(), selection.y(), selection.width(), selection.height())


def _is_open(doc: Document | None) -> bool:
    return doc is not None and any(doc == other for other in Krita.instance().documents())


def _format_of(doc: Document) -> PixelFormat | None:
    try:
        return pixel_format(doc.colorModel(), doc.colorDepth())
    except UnsupportedFormat:
        return None


def _stack(node: Node) -> Iterator[Node]:
    """Every node under ``node``, bottom of the layer stack first (``childNodes`` lists bottom to top; a
    group's children come before the group, which is where they show)."""
    for child in node.childNodes():
        yield from _stack(child)
        yield child


def _topmost(root: Node, node_ids: tuple[Any, ...]) -> Node | None:
    """The node highest in the stack among ``node_ids`` (None when none of them exists any more)."""
    found = None
    if node_ids:
        for node in _stack(root):
            node_id = node.uniqueId()
            if any(node_id == i for i in node_ids):
                found = node
    return found


def _find_node(node: Node, node_id: Any) -> Node | None:
    for child in node.childNodes():
        if child.uniqueId() == node_id:
            return child
        found = _find_node(child, node_id)
        if found is not None:
            return found
    return None


def _doc_name(doc: Document) -> str:
    path = doc.fileName()
    return path.replace("\\", "/").rsplit("/", 1)[-1] if path else (doc.name() or "an unsaved image")
