"""The live preview layer in Krita (``core.live_port.LivePort``): the second, and last, module besides
``krita_adapter`` that calls Krita's API.

Measured in Krita 5.1 (tests/benchmarks/bench_live.py): ``Node.setPixelData`` writes a layer's pixels with
no undo step and no redraw; ``Document.refreshProjection`` redraws (the whole image: about 9 ms at
1024x1024, 35 ms at 2048x2048 on a 2-core machine). So the preview is one paint layer made once per session
(one "Add Layer" undo step, when Live is turned on) and updated in place: 500 updates leave the undo stack as
they found it. ``Node.setVisible`` does not redraw either: with Source: Image the preview is hidden, the
image redrawn and read, and the preview shown again, within one call (no frame is painted in between).

``Document.waitForDone`` (inside ``refreshProjection`` and the capture) asks a running stroke to end: while
the artist's pen is down (``tryBarrierLock`` fails) nothing here waits on the image; ``LiveBusy`` says
"later".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from krita import Document, Krita, Node  # type: ignore[import-not-found]
from PyQt5.QtCore import QByteArray, QTimer
from PyQt5.QtWidgets import QAbstractItemView

from krita_sdxl.protocol.geometry import Box, Extent

from ..core.document import AdapterError, Capture, Placed, Planner
from ..core.live_port import PREVIEW_NAME, LiveBusy, LiveGone
from ..core.live_watch import Shape
from ..core.pixelformat import PixelFormat
from .buffers import to_qbytearray
from .krita_adapter import (
    MASK_TYPES,
    _doc_name,
    _find_node,
    _is_open,
    _placed,
    _selection_box,
    _source_layer,
    capture_from,
)

RESTORE_ACTIVE_MS = (0, 150)  # Krita makes a new layer active a moment after adding it: put the source back


@dataclass
class Session:
    doc: Document
    source: str  # "layer" or "canvas"
    node_id: Any  # the source layer's uniqueId (None: the visible image)
    preview_id: Any
    active_id: Any  # the layer the artist paints on: kept active
    name: str  # the source layer's name, for messages
    box: Box | None = None  # where the preview holds pixels
    history_view: Any = None  # Krita's Undo History list (found once)
    hooks: list[Any] = field(default_factory=list)  # (signal, slot) connected by ``notify``


class KritaLive:
    def start(self, source: str) -> Session:
        doc = Krita.instance().activeDocument()
        if doc is None:
            raise AdapterError("Open a document first.")
        if source == "layer":
            node = _source_layer(doc)
            parent, above, keep = node.parentNode(), node, node
        else:
            node, parent = None, doc.rootNode()
            children = parent.childNodes()
            above, keep = (children[-1] if children else None), doc.activeNode()
        preview = doc.createNode(PREVIEW_NAME, "paintlayer")
        parent.addChildNode(preview, above)  # the session's one undo step ("Add Layer")
        preview.setLocked(True)  # nobody paints on it by mistake
        session = Session(doc, source, node.uniqueId() if node is not None else None, preview.uniqueId(),
                          keep.uniqueId() if keep is not None else None,
                          node.name() if node is not None else "the visible image")  # fmt: skip
        self._keep_active(session, preview)
        return session

    def shape(self, session: Session) -> Shape:
        doc = self._doc(session)
        selection = doc.selection()
        box = _selection_box(selection)
        mask = selection.pixelData(*box) if box is not None and selection is not None else None
        canvas = Extent(doc.width(), doc.height())
        if session.node_id is not None:
            return Shape(canvas, box, mask)
        active = self._painted(session)
        return Shape(canvas, box, mask, _layers(doc.rootNode(), session.preview_id), self._history(session),
                     active.uniqueId() if active is not None else None)  # fmt: skip

    def read(self, session: Session, box: Box) -> QByteArray:
        self._doc(session)
        if session.node_id is not None:
            return self._source(session).projectionPixelData(*box)
        active = self._painted(session)  # Source: Image: the layer being painted on (the preview covers the image)
        return active.projectionPixelData(*box) if active is not None else QByteArray()

    def capture(self, session: Session, planner: Planner) -> Capture:
        doc = self._doc(session)
        self._not_busy(doc)
        if session.node_id is not None:
            return capture_from(doc, self._source(session), planner)
        preview = self._preview(session)
        preview.setVisible(False)  # the image as it is without the preview: no feedback loop
        doc.refreshProjection()
        try:
            return capture_from(doc, None, planner)
        finally:
            preview.setVisible(True)
            doc.refreshProjection()

    def show(self, session: Session, box: Box, fmt: PixelFormat, data: Any) -> None:
        doc = self._doc(session)
        self._not_busy(doc)
        preview = self._preview(session)
        old = session.box
        if old is not None and old != box:  # a new area (the selection moved): clear the old one
            preview.setPixelData(QByteArray(old.width * old.height * fmt.bytes_per_pixel, "\0"), *old)
        preview.setPixelData(to_qbytearray(data), *box)  # in place: no undo step
        session.box = box
        doc.refreshProjection()

    def apply(self, session: Session, name: str, box: Box, data: Any) -> Placed:
        doc = self._doc(session)
        preview = self._preview(session)
        parent = preview.parentNode()
        siblings = parent.childNodes()
        index = next(i for i, n in enumerate(siblings) if n.uniqueId() == session.preview_id)
        layer = doc.createNode(name, "paintlayer")
        layer.setPixelData(to_qbytearray(data), *box)  # detached: the pixels are part of the one undo step
        parent.addChildNode(layer, siblings[index - 1] if index > 0 else None)  # directly below the preview
        self._keep_active(session, layer)
        return _placed(doc, layer)

    def notify(self, session: Session, poke: Callable[[], None]) -> None:
        """Call ``poke`` whenever Krita's undo stack moves (a stroke ends, an edit, undo, redo): the change
        is looked for at once instead of at the next check. Krita's own signal where it has one: its Undo
        History list's model; without that docker the checks alone see every change."""
        view = session.history_view = session.history_view or _history_view()
        if view is None:
            return

        def slot(*_args: Any) -> None:
            poke()

        model, selection = view.model(), view.selectionModel()
        signals = [model.rowsInserted, model.rowsRemoved, model.modelReset] if model is not None else []
        signals += [selection.currentChanged] if selection is not None else []
        for signal in signals:
            signal.connect(slot)
            session.hooks.append((signal, slot))

    def stop(self, session: Session) -> None:
        for signal, slot in session.hooks:
            with contextlib.suppress(TypeError, RuntimeError):  # already gone with its docker
                signal.disconnect(slot)
        session.hooks.clear()
        try:
            if _is_open(session.doc):
                preview = _find_node(session.doc.rootNode(), session.preview_id)
                if preview is not None:
                    preview.remove()
        except Exception:  # the document is going away: nothing to clean up
            pass

    # --- helpers -------------------------------------------------------------------------------

    def _doc(self, session: Session) -> Document:
        if not _is_open(session.doc):
            raise LiveGone("its document was closed")
        return session.doc

    def _source(self, session: Session) -> Node:
        node = _find_node(session.doc.rootNode(), session.node_id)
        if node is None:
            raise LiveGone(f"the layer “{session.name}” was deleted")
        return node

    def _preview(self, session: Session) -> Node:
        node = _find_node(session.doc.rootNode(), session.preview_id)
        if node is None:
            raise LiveGone(f"the “{PREVIEW_NAME}” layer of {_doc_name(session.doc)} was deleted or undone")
        return node

    def _painted(self, session: Session) -> Node | None:
        """The layer the artist paints on (a mask's layer), None when that is the preview itself."""
        node = session.doc.activeNode()
        if node is not None and node.type() in MASK_TYPES:
            node = node.parentNode()
        if node is None or node.parentNode() is None or node.uniqueId() == session.preview_id:
            return None
        return node

    def _history(self, session: Session) -> tuple[int, int] | None:
        """Krita's undo stack of the document shown (as its Undo History docker lists it): its length and
        position. Every edit of any layer, undo and redo move it. None when the session's document is not
        the one shown, or the docker is missing."""
        if Krita.instance().activeDocument() != session.doc:
            return None
        if session.history_view is None:
            session.history_view = _history_view()
        view = session.history_view
        try:
            model = view.model() if view is not None else None
            return (model.rowCount(), view.currentIndex().row()) if model is not None else None
        except RuntimeError:  # the docker was deleted (its window closed)
            session.history_view = None
            return None

    @staticmethod
    def _not_busy(doc: Document) -> None:
        if not doc.tryBarrierLock():
            raise LiveBusy("a stroke is under way")
        doc.unlock()

    def _keep_active(self, session: Session, made: Node) -> None:
        """Keep the layer the artist paints on active: Krita activates a layer just added (``made``), now
        or a moment later; the artist's own choice of another layer meanwhile is left alone."""
        ours = {session.preview_id, made.uniqueId()}

        def restore() -> None:
            try:
                if session.active_id is None or not _is_open(session.doc):
                    return
                active = session.doc.activeNode()
                if active is None or active.uniqueId() in ours:
                    node = _find_node(session.doc.rootNode(), session.active_id)
                    if node is not None:
                        session.doc.setActiveNode(node)
            except Exception:  # a document closing meanwhile: nothing to restore
                pass

        restore()
        for ms in RESTORE_ACTIVE_MS:
            QTimer.singleShot(ms, restore)


def _layers(root: Node, preview_id: Any) -> tuple[Any, ...]:
    """Every layer's id and how it shows (visibility, opacity, blending), the preview left out."""
    out: list[Any] = []

    def walk(node: Node) -> None:
        for child in node.childNodes():
            if child.uniqueId() != preview_id:
                out.append((child.uniqueId(), child.visible(), child.opacity(), child.blendingMode()))
                walk(child)

    walk(root)
    return tuple(out)


def _history_view() -> QAbstractItemView | None:
    """The list in Krita's Undo History docker (it exists, shown or not, in every window)."""
    for docker in Krita.instance().dockers():
        if docker.objectName() == "History":
            views = docker.findChildren(QAbstractItemView)
            if views:
                return views[0]
    return None
