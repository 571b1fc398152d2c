"""Raw sockets for attack tests: a DEALER with any routing id (or none), any frames, and events
decoded and validated with the protocol codec, exactly as a client would.

The helpers also speak protocol 1 (pixels inline after the header), so that a test can be run
against the code before protocol 2 to see it fail for the reason it tests."""

from __future__ import annotations

import random
import secrets
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.auth

from krita_sdxl.backend.engine.identity import IdentityEngine
from krita_sdxl.backend.engine.request import JobCancelled, ProgressFn, RefineRequest, StopFn
from krita_sdxl.backend.service.limits import Limits
from krita_sdxl.backend.service.security import CurveConfig
from krita_sdxl.backend.service.server import Service
from krita_sdxl.protocol import PROTOCOL_VERSION, SERVICE, Image, ImageSpec, Message, decode

STREAMED = PROTOCOL_VERSION >= 2  # pixels in chunks under credit
if STREAMED:
    from krita_sdxl.protocol import Incoming, Outgoing
    from krita_sdxl.protocol.codec import stream_specs


def service_options(**options: Any) -> dict[str, Any]:
    """Service keyword arguments, leaving out those the code under test does not have."""
    import inspect

    known = inspect.signature(Service.__init__).parameters
    return {k: v for k, v in options.items() if k in known}


def limits(**fields: Any) -> Limits:
    """Limits with these fields, leaving out those the code under test does not have."""
    known = getattr(Limits, "__dataclass_fields__", {})
    return Limits(**{k: v for k, v in fields.items() if k in known})


def good_id() -> bytes:
    return b"t" + secrets.token_bytes(16)


def rgba(w: int, h: int, seed: int = 0) -> Image:
    return Image(ImageSpec(w, h, "RGBA", 8), random.Random(seed).randbytes(w * h * 4))


def header(msg_type: str, **fields: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": msg_type, **fields}, use_bin_type=True)


def submit_frames(job: str, image: Image | None = None, **fields: Any) -> list[Any]:
    """A submit's header (its pixels follow in chunks: ``Peer.submit`` sends both; protocol 1: inline)."""
    image = image or rgba(16, 16)
    spec = image.spec.to_wire()
    return [header("submit", job=job, image=spec, **fields)] + ([] if STREAMED else [bytes(image.data)])


def chunk_frames(job: str, offset: int, data: Any) -> list[Any]:
    return [header("chunk", job=job, offset=offset), bytes(data)]


class Peer:
    """One DEALER socket; ``routing_id`` None = libzmq's own (predictable) id."""

    def __init__(
        self,
        endpoint: str,
        routing_id: bytes | None = b"",
        curve: tuple[bytes, Path] | None = None,
        ctx: zmq.Context | None = None,
        rcvhwm: int | None = None,
    ) -> None:
        self.routing_id = good_id() if routing_id == b"" else routing_id
        self.socket = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if rcvhwm is not None:
            self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
            self.socket.setsockopt(zmq.RCVBUF, 4096)
        if self.routing_id is not None:
            self.socket.setsockopt(zmq.ROUTING_ID, self.routing_id)
        if curve is not None:
            server_public, secret_file = curve
            public, secret = zmq.auth.load_certificate(str(secret_file))
            self.socket.curve_publickey = public
            self.socket.curve_secretkey = secret
            self.socket.curve_serverkey = server_public
        self.socket.connect(endpoint)
        self._downloads: dict[str, tuple[Message, Incoming]] = {}
        self.hold_results = False  # True: a client that does not read its results (until read_held)
        self._held: list[Message] = []
        self._backlog: deque[Message] = deque()  # events read by send_job, for recv

    def send(self, frames: list[Any]) -> None:
        self.socket.send_multipart(frames, copy=False)

    def recv_raw(self, timeout: float = 10.0) -> Message | None:
        """The next event as it came, decoded and validated (None on timeout)."""
        if not self.socket.poll(int(timeout * 1000)):
            return None
        return decode(SERVICE, self.socket.recv_multipart(copy=False))

    def recv(self, timeout: float = 10.0) -> Message | None:
        """The next event as a client sees it (None on timeout): a result once all its chunks are in
        (each acknowledged with a credit, as a client does)."""
        if self._backlog:
            return self._backlog.popleft()
        deadline = time.monotonic() + timeout
        while True:
            event = self.recv_raw(max(0.0, deadline - time.monotonic()))
            if event is None:
                return None
            if event.type == "result" and not STREAMED:
                if self.hold_results:
                    self._held.append(event)
                    continue
                return event
            if event.type in ("result", "chunk"):
                if self.hold_results:
                    self._held.append(event)
                    continue
                result = self._stream(event)
                if result is None:
                    continue
                return result
            return event

    def _stream(self, event: Message) -> Message | None:
        """A result's header or chunk: the complete result once its last chunk is in (acknowledged)."""
        job = event.job or ""
        if event.type == "result":
            self._downloads[job] = (event, Incoming(job, stream_specs(event)))
            return None
        if job not in self._downloads:
            return None
        result, incoming = self._downloads[job]
        incoming.put(event["offset"], event.payload)
        self.send([header("credit", job=job, received=incoming.received)])
        if not incoming.done:
            return None
        del self._downloads[job]
        result.images = incoming.images()
        return result

    def drain(self, quiet: float = 0.5) -> list[Message]:
        """Every event until a silence of ``quiet`` seconds."""
        out = []
        while (event := self.recv(quiet)) is not None:
            out.append(event)
        return out

    def read_held(self, timeout: float = 10.0) -> list[Message]:
        """Read the results held so far, and the rest of them as they come; the complete results."""
        self.hold_results = False
        if not STREAMED:
            done, self._held = self._held, []
            while (event := self.recv(0.5)) is not None:
                done += [event] if event.type == "result" else []
            return done
        done = [r for r in (self._stream(e) for e in self._held) if r is not None]
        self._held = []
        while self._downloads:
            event = self.recv(timeout)
            if event is None:
                break
            if event.type == "result":
                done.append(event)
        return done

    def submit(
        self, job: str, image: Image | None = None, mask: Image | None = None, timeout: float = 10.0, **fields: Any
    ) -> list[Message]:
        """Submit as a client does (the header, then the chunks as credit comes); the events received
        until the upload ends (the job's ``accepted``, ``error`` or ``cancelled``) or a silence."""
        image = image or rgba(16, 16)
        if mask is not None:
            fields["mask"] = mask.spec.to_wire()
        self.send(submit_frames(job, image, **fields) + ([] if STREAMED or mask is None else [bytes(mask.data)]))
        out = Outgoing(job, [image.data] + ([mask.data] if mask is not None else [])) if STREAMED else None
        events = []
        while True:
            event = self.recv(timeout)
            if event is None:
                return events
            events.append(event)
            if event.job != job:
                continue
            if event.type == "credit" and out is not None:
                out.grant(event["received"], event["until"])
                for offset, data in out.chunks():
                    self.send(chunk_frames(job, offset, data))
            elif event.type in ("accepted", "error", "cancelled"):
                return events

    def send_job(self, job: str, image: Image | None = None, mask: Image | None = None, **fields: Any) -> None:
        """Submit as a client does (``submit``: the header, the pixels under credit, until ``accepted``); the
        events that arrived meanwhile (credit aside) wait for ``recv``, in order."""
        kept, self._backlog = self._backlog, deque()
        kept.extend(e for e in self.submit(job, image, mask, **fields) if e.type != "credit")
        self._backlog = kept

    def pending(self) -> bool:
        """Whether ``recv`` has events at hand (read by ``send_job``) before the socket's."""
        return bool(self._backlog)

    def ask(self, frames: list[Any], timeout: float = 10.0) -> Message | None:
        self.send(frames)
        return self.recv(timeout)

    def events_until(self, done: Callable[[Message], bool], timeout: float = 30.0) -> list[Message]:
        """Events until one for which ``done`` is true (included); stops at a silence of ``timeout``.
        Like a live client it sends a heartbeat every second meanwhile (their replies are skipped)."""
        out = []
        silent_until = time.monotonic() + timeout
        beat_at = time.monotonic() + 1.0
        while time.monotonic() < silent_until:
            event = self.recv(max(beat_at - time.monotonic(), 0.0))
            if time.monotonic() >= beat_at:  # a second gone, however busy the stream of events
                self.send([header("heartbeat")])
                beat_at = time.monotonic() + 1.0
            if event is None:
                continue
            silent_until = time.monotonic() + timeout
            if event.type == "heartbeat":
                continue
            out.append(event)
            if done(event):
                return out
        return out

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def final(job: str) -> Callable[[Message], bool]:
    return lambda e: e.job == job and e.type in ("result", "error", "cancelled")


class SlowEngine(IdentityEngine):
    """The identity engine, with ``steps`` denoising steps that each take ``step_s`` and report
    progress, and an optional gate that holds every job until it is opened."""

    def __init__(self, step_s: float = 0.0, modes: tuple[str, ...] = ("refine",), gate: bool = False) -> None:
        self.step_s = step_s
        self.modes = list(modes)
        self.gate = threading.Event()
        if not gate:
            self.gate.set()
        if len(modes) > 1:
            from krita_sdxl.backend.engine.stages import scheduler_timesteps

            self.timesteps = scheduler_timesteps()  # the real SDXL scheduler's, for the generate split

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "modes": self.modes}

    def unload(self, model: str) -> tuple[bool, bool]:
        """Nothing to free (was loaded, deferred): the service's rules about who may unload are tested."""
        return False, False

    def refine(self, req: RefineRequest, on_progress: ProgressFn, should_stop: StopFn) -> Image:
        while not self.gate.wait(0.01):
            if should_stop():
                raise JobCancelled()
        total = req.plan.denoise_steps
        for step in range(1, total + 1):
            if should_stop():
                raise JobCancelled()
            if self.step_s:
                time.sleep(self.step_s)
            on_progress(step, total, None)
        return req.image


class Running:
    """An in-process Service on its own thread (real sockets), stopped on exit."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.thread = threading.Thread(target=service.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return self.service.endpoint

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.service.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


# -- CURVE: keys and an in-process CURVE service ----------------------------------------------


def keypair(folder: Path, name: str, authorize_in: Path | None = None) -> Path:
    """A key pair in ``folder`` (returns the secret file); its public file copied to ``authorize_in``."""
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    if authorize_in is not None:
        authorize_in.mkdir(parents=True, exist_ok=True)
        shutil.copy(public, authorize_in / f"{name}.key")
    return Path(secret)


def host_address() -> str:
    """This machine's own address on its network (not loopback): a client from "another machine"."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.123", 9))  # no packet is sent: the kernel picks the outgoing address
        address = s.getsockname()[0]
    assert not address.startswith("127."), f"this machine has no network address besides loopback ({address})"
    return address


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CurveService:
    def __init__(self, tmp: Path, authorized: Path, engine: SlowEngine, host: str = "127.0.0.1", **kw: Any) -> None:
        """``host``: where it listens (0.0.0.0: every address, reached here through ``host_address()``)."""
        server_secret = keypair(tmp / "server", "server")
        self.server_public = zmq.auth.load_certificate(str(server_secret))[0]
        self.authorized = authorized
        port = free_port()
        self.ctx = zmq.Context()  # its own: the ZAP handler is per context
        service = Service(
            engine, f"tcp://{host}:{port}", ctx=self.ctx, curve=CurveConfig(server_secret, authorized), **kw
        )
        self.running = Running(service)
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.port = port

    def peer(self, secret: Path, routing_id: bytes | None = b"") -> Peer:
        return Peer(self.endpoint, routing_id=routing_id, curve=(self.server_public, secret))

    def close(self) -> None:
        try:
            self.running.__exit__()
        finally:
            self.ctx.destroy(linger=0)
