"""Fakes shared by the plugin's tests: a real ZeroMQ ROUTER standing in for the service (in the test's
thread: :func:`pump` runs Qt's event loop in small slices and lets it answer ``hello``/``heartbeat``
between them) and a fake document side (the adapter), so the controller and the docker run without Krita.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from PyQt5.QtCore import QEventLoop
from PyQt5.QtWidgets import QApplication

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))

from krita_sdxl.backend.setup.plan import VERSION
from krita_sdxl.protocol import CLIENT, SERVICE, Image, Incoming, Message, decode, encode
from krita_sdxl.protocol.codec import stream_specs
from krita_sdxl.protocol.geometry import Box, Extent
from krita_sdxl_refiner.adapters.client import Client
from krita_sdxl_refiner.compose import build_controller
from krita_sdxl_refiner.core.document import AdapterError, Capture, NotApplied, Placed
from krita_sdxl_refiner.core.jobs import Target
from krita_sdxl_refiner.core.pixelformat import pixel_format
from krita_sdxl_refiner.workflow.controller import Controller

CAPS = {"device": "cpu", "dtype": "float32", "models": [], "modes": ["refine"], "protocol_version": 2,
        "backend_version": VERSION}  # fmt: skip


class Uploads:
    """The service's side of a submit's stream, as a fake does it: credit for everything at once,
    and the submit (with its pixels) once its last chunk is in."""

    def __init__(self) -> None:
        self._incoming: dict[tuple[bytes, str], tuple[Message, Incoming]] = {}
        self.window: int | None = None  # None: credit for everything at once; else as the service does
        self.hold = False  # True: no more credit until it is False again (a slow link, seen from the docker)

    def feed(self, ident: bytes, msg: Message) -> tuple[Message | None, list[list[Any]]]:
        """(the complete submit, or None; the answers to send)."""
        if msg.type == "submit":
            incoming = Incoming(msg.job or "", stream_specs(msg))
            self._incoming[(ident, incoming.job)] = (msg, incoming)
            return None, [encode(SERVICE, "credit", job=incoming.job, received=0, until=self._until(incoming))]
        if msg.type == "chunk" and (ident, msg.job) in self._incoming:
            submit, incoming = self._incoming[(ident, msg.job or "")]
            incoming.put(msg["offset"], msg.payload)
            if not incoming.done:
                return None, [encode(SERVICE, "credit", job=incoming.job, received=incoming.received,
                                     until=self._until(incoming))]  # fmt: skip
            del self._incoming[(ident, incoming.job)]
            submit.images = incoming.images()
            return submit, []
        return None, []

    def _until(self, incoming: Incoming) -> int:
        if self.window is None:
            return incoming.total
        return min(incoming.total, incoming.received + (0 if self.hold else self.window))

    def release(self) -> list[tuple[bytes, list[Any]]]:
        """``hold`` ended: the credits to send for the uploads under way."""
        self.hold = False
        return [(ident, encode(SERVICE, "credit", job=incoming.job, received=incoming.received,
                               until=self._until(incoming)))
                for (ident, _), (_, incoming) in self._incoming.items()]  # fmt: skip


def result_frames(image: Image, **fields: Any) -> list[list[Any]]:
    """A result as a service sends it: its header, then its pixels in chunks (all at once: a fake)."""
    data = memoryview(image.data).cast("B")
    step = 1024 * 1024
    chunks = [encode(SERVICE, "chunk", payload=data[o : o + step], job=fields["job"], offset=o)
              for o in range(0, data.nbytes, step)]  # fmt: skip
    return [encode(SERVICE, "result", images={"image": image}, **fields), *chunks]


class FakeService:
    """A ROUTER that answers hello and heartbeat (while ``alive``) and records everything."""

    def __init__(self, ctx: zmq.Context, endpoint: str = "tcp://127.0.0.1:*", curve_secret: str | None = None) -> None:
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if curve_secret is not None:
            from zmq import auth as zmq_auth

            public, secret = zmq_auth.load_certificate(curve_secret)
            self.router.curve_secretkey, self.router.curve_publickey = secret, public
            self.router.curve_server = True
        deadline = time.monotonic() + 5
        while True:  # a just-closed listener on the same port is released asynchronously
            try:
                self.router.bind(endpoint)
                break
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.alive = True
        self.caps = dict(CAPS)
        self.received: list[tuple[bytes, Message]] = []  # a submit once all its pixels are in
        self.uploads = Uploads()

    def poll(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ident, msg = frames[0], decode(CLIENT, frames[1:])
            if msg.type in ("submit", "chunk"):
                done, answers = self.uploads.feed(ident, msg)
                for answer in answers if self.alive else []:
                    self.router.send_multipart([ident, *answer])
                if done is None:
                    continue
                msg = done
            if msg.type == "credit":  # a result's chunks acknowledged
                continue
            self.received.append((ident, msg))
            if not self.alive:
                continue
            if msg.type == "hello":
                self.send(ident, "welcome", server="fake", capabilities=self.caps)
            elif msg.type == "heartbeat":
                self.send(ident, "heartbeat")

    def send(self, ident: bytes, msg_type: str, images: dict[str, Image] | None = None, **fields: Any) -> None:
        if msg_type == "result" and images:
            for frames in result_frames(images["image"], **fields):
                self.router.send_multipart([ident, *frames])
            return
        self.router.send_multipart([ident, *encode(SERVICE, msg_type, images=images, **fields)])

    def of_type(self, msg_type: str) -> list[tuple[bytes, Message]]:
        return [(i, m) for i, m in self.received if m.type == msg_type]

    def close(self) -> None:
        self.router.close(linger=0)


def pump(app: QApplication, until: Callable[[], bool], services: list[FakeService], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for s in services:
            s.poll()
        app.processEvents(QEventLoop.AllEvents, 10)
        if until():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.002)


class FakeAdapter:
    def __init__(self) -> None:
        self.store = {"prompt": "a red barn", "seed": "-1", "preview": "true", "strength": "0.5"}
        self.written: dict[str, str] = {}
        self.applied: list[tuple[Box, bytes, str]] = []
        self.apply_reason: str | None = None
        self.to_active: list[str] = []
        self.canvas = Extent(300, 200)
        self.bounds = Box(0, 0, 300, 200)  # the layer's painted area
        self.selection: Box | None = Box(100, 50, 60, 40)
        self.fail_capture: Exception | None = None
        self.targets: list[Target] = []
        self.fill = 7  # the value of every captured byte (change it to "paint" the layer)
        self.captures = 0
        self.opened: list[str] = []
        self.open_error: str | None = "no window"
        self.document: Any = "doc"
        self.placed_active = True  # the result's document is the one shown
        self.scaled: list[tuple[Extent, Extent]] = []  # "Scale this document": (from, to)
        self.opened_boxes: list[Box] = []
        self.on_apply: Any = None  # called inside apply, as Krita's addChildNode runs the event loop there

    def read_setting(self, key: str, default: str) -> str:
        return self.store.get(key, default)

    def write_setting(self, key: str, value: str) -> None:
        self.written[key] = value

    def capture(self, source: str, planner) -> Capture:
        if self.fail_capture:
            raise self.fail_capture
        plan = planner(self.canvas, self.bounds, self.selection)
        fmt = pixel_format("RGBA", "U8")
        crop = plan.crop
        self.captures += 1
        pixels = bytes([self.fill]) * (crop.width * crop.height * 4)
        mask = bytes([255]) * (crop.width * crop.height) if plan.masked else None
        target = Target(self.document, "node", source, "layer 1")
        return Capture(plan, fmt, "sRGB-elle-V2-srgbtrc.icc", "srgb", pixels, mask, target)

    def apply(self, target, box, fmt, data, name):
        if self.apply_reason is not None:
            raise NotApplied(self.apply_reason)
        self.applied.append((box, bytes(data), name))
        self.targets.append(target)
        if self.on_apply is not None:
            self.on_apply()
        return Placed(f"layer-{len(self.applied)}", "barn.kra", self.placed_active)

    def apply_to_active(self, name, box, fmt, data):
        self.to_active.append(name)
        return Placed("active-layer", "other.kra", True, self.document)

    def open_as_document(self, name, box, fmt, profile, data):
        if self.open_error:
            raise AdapterError(self.open_error)
        self.opened.append(name)
        self.opened_boxes.append(box)
        return "Untitled 2"

    def scale_document(self, target, expected, size):
        if expected != self.canvas:
            raise NotApplied(f"its document is {self.canvas} now, no longer {expected}")
        self.scaled.append((expected, size))
        self.canvas = size

    def active_document(self):
        return self.document


def make_controller(ctx, endpoint: str, adapter: FakeAdapter) -> Controller:
    adapter.store["endpoint"] = endpoint
    client = Client(endpoint, interval=0.05, timeout=0.5, context=ctx)
    return build_controller(adapter, client=client)  # wired as in Krita (plugin.py), with a quicker client
