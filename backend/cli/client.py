"""A blocking DEALER client for the CLI, tests and benchmarks (the Krita plugin has its own, on Qt).

Pixels go up and come back in chunks under credit (protocol/transfer.py): ``submit`` sends the
header, and the chunks follow as the service's ``credit`` events arrive while the caller waits for
events; a connection uploads one job at a time, so a submit made meanwhile waits here until the one
before is accepted. A ``result`` is handed to the caller only once all its chunks are there (each
acknowledged with a ``credit``). ``credit`` events are passed on too (``received`` of the job's bytes:
upload progress)."""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from krita_sdxl.protocol import CLIENT, SERVICE, Image, Message, decode, encode
from krita_sdxl.protocol.endpoint import DEFAULT_ENDPOINT, EndpointError, check_ipc_connect, parse_endpoint
from krita_sdxl.protocol.streams import ClientStreams

from .reachability import EVENTS as REACHABILITY_EVENTS
from .reachability import Reachability

_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
_WATCHED = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _FAILED | REACHABILITY_EVENTS


class ServiceUnavailable(ConnectionError):
    pass


class JobLost(ServiceUnavailable):
    """The service no longer knows the job (it restarted, or dropped it): running it again is safe."""


class JobFailed(RuntimeError):
    def __init__(self, event: Message) -> None:
        f = event.fields
        text = f.get("message") or f"job {f.get('job')} was {event.type}"
        super().__init__(text)
        self.event = event
        self.code = f.get("code", event.type)
        self.field = f.get("field")


class ServiceClient:
    _ids = itertools.count(1)

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout: float = 10.0,
        ctx: zmq.Context | None = None,
        heartbeat_interval: float = 1.0,
        server_key: str | None = None,
        client_secret_file: Path | None = None,
    ) -> None:
        """``timeout``: longest silence (not even a heartbeat reply) before ServiceUnavailable.
        ``server_key`` + ``client_secret_file``: CURVE, for a service beyond loopback.
        EndpointError (at once) for an endpoint that cannot work or another user's ipc socket."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self._ctx = ctx or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.ROUTING_ID, b"k" + secrets.token_bytes(16))  # unguessable: nobody takes our jobs
        self.socket.setsockopt(zmq.LINGER, 0)
        if server_key is not None and client_secret_file is not None:
            from krita_sdxl.backend.service.security import client_curve

            client_curve(self.socket, server_key, client_secret_file)
        self._streams = ClientStreams()  # pixels up and down in chunks (protocol/streams.py)
        self._connect(endpoint, client_secret_file)
        self._prefix = f"{os.getpid()}-{id(self):x}-"

    def _connect(self, endpoint: str, client_secret_file: Path | None = None) -> None:
        """Check the endpoint (one place: protocol/endpoint.py), refuse an ipc socket another user owns,
        watch the connection (handshake failures, reconnects) and connect."""
        try:
            parsed = parse_endpoint(endpoint)
            if parsed.scheme == "ipc":
                check_ipc_connect(parsed)
        except EndpointError:
            self.socket.close(linger=0)
            raise
        self.endpoint = parsed.text
        self.status_interval = 5.0  # seconds without news of a job before asking the service about it
        self.handshake_error: str | None = None  # why the service turned this client away
        self._secret_file = client_secret_file
        self._handshaken = self._dropped = self._reconnected = False
        self._last_heard = time.monotonic()
        self._last_sent = 0.0  # when this client last sent anything (the service's proof of life)
        # why nothing answers, told within seconds (nothing listening, a name that does not resolve, not ZeroMQ)
        self._reach = Reachability(parsed, curve=self.socket.getsockopt(zmq.MECHANISM) == zmq.CURVE)
        self._monitor = self.socket.get_monitor_socket(_WATCHED)
        self._monitor.setsockopt(zmq.LINGER, 0)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.socket.connect(parsed.text)

    def _watch(self) -> None:
        """Connection events: a reconnect (the service may have restarted) or a refused handshake."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            kind, value = event["event"], event["value"]
            self._reach.seen(kind)
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._reconnected = self._reconnected or self._dropped
                self._handshaken, self._dropped = True, False
            elif kind == zmq.EVENT_DISCONNECTED:
                self._dropped = self._dropped or self._handshaken
            elif kind & _FAILED:
                self.handshake_error = self._handshake_text(kind, value)

    def _handshake_text(self, kind: int, value: int) -> str:
        curve = self.socket.getsockopt(zmq.MECHANISM) == zmq.CURVE
        where = f"the service at {self.endpoint}"
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH and self._secret_file is not None:
            from zmq.auth import load_certificate

            from krita_sdxl.protocol.authorize import authorize_command

            public = load_certificate(str(self._secret_file))[0].decode("ascii")
            return (
                f"{where} refused this client's key; on the service's machine run (with the folder given to "
                f"serve --authorized-keys): {authorize_command(public)}"
            )
        not_zeromq = self._reach.handshake_failed()  # a peer that is not a ZeroMQ service at all
        if not_zeromq is not None:
            return not_zeromq
        if curve:
            if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                return f"{where} does not use CURVE keys; leave out --server-key and --client-key"
            return f"the CURVE handshake with {where} failed: is --server-key the service's public key?"
        return (
            f"{where} requires CURVE keys (the handshake failed): pass --server-key (its public key) and "
            "--client-key (your NAME.key_secret from `krita-sdxl keys`, authorized on the service)"
        )

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_job_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def send(self, msg_type: str, images: dict[str, Image] | None = None, payload: Any = None, **fields: Any) -> None:
        """Queue one message; never blocks (ServiceUnavailable when ZeroMQ cannot queue it)."""
        self._send_frames(encode(CLIENT, msg_type, images=images, payload=payload, **fields))

    def _send_frames(self, frames: list[Any]) -> None:
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise ServiceUnavailable(f"cannot reach {self.endpoint}: no connection to a service") from None
        self._last_sent = time.monotonic()

    def receive(self, timeout: float | None = None) -> Message:
        """Next event from the service (heartbeat replies are consumed here). While waiting, a heartbeat
        goes out every ``heartbeat_interval`` so the service knows this client is alive; ServiceUnavailable
        when nothing at all, not even a heartbeat reply, arrives for ``timeout`` seconds, or at once
        when the service turns this client away (CURVE keys)."""
        wait = self.timeout if timeout is None else timeout
        start = time.monotonic()
        while True:
            left = max(start, self._last_heard) + wait - time.monotonic()
            if left <= 0:
                raise ServiceUnavailable(self._silence_text(wait))
            event = self._next(left)
            if event is not None:
                return event

    def _silence_text(self, wait: float) -> str:
        if not self._handshaken and (why := self._reach.verdict(forced=True)) is not None:
            return why
        if self._dropped:
            return f"lost the connection to {self.endpoint}: no answer for {wait:g} s (did the service stop?)"
        return f"no answer from {self.endpoint} within {wait:g} s: is `krita-sdxl serve` running there?"

    def _next(self, left: float) -> Message | None:
        """Wait up to one heartbeat interval (at most ``left`` s) for a message; None when nothing but a
        heartbeat reply or a connection event came. A message after a silence of more than two
        intervals marks a possible restart (checked by ``events``)."""
        ready = dict(self._poller.poll(int(min(left, self.heartbeat_interval, self._reach.wait_left()) * 1000) + 1))
        if self._monitor in ready or not self._handshaken:
            self._watch()
        if self.handshake_error is not None:
            raise ServiceUnavailable(self.handshake_error)
        if not self._handshaken and (why := self._reach.verdict()) is not None:
            raise ServiceUnavailable(why)  # nothing listens, or not a ZeroMQ service: no use waiting for the timeout
        if time.monotonic() - self._last_sent >= self.heartbeat_interval:
            # On a schedule, whatever arrives: a job streaming progress faster than the interval
            # would otherwise leave the service without news, and it cancels a silent client's jobs.
            try:
                self.send("heartbeat")
            except ServiceUnavailable:
                pass  # still connecting or reconnecting; the deadline decides
        if self.socket not in ready:
            return None
        event = decode(SERVICE, self.socket.recv_multipart(copy=False))
        now = time.monotonic()
        if now - self._last_heard > 2 * self.heartbeat_interval + 0.5:
            self._reconnected = True
        self._last_heard = now
        return None if event.type == "heartbeat" else self._stream(event)

    def _stream(self, event: Message) -> Message | None:
        """Chunks and credits (protocol/streams.py): send what they call for; the event to hand to the
        caller (a result only once complete), or None."""
        event_out, send = self._streams.on_event(event)
        for frames in send:
            self._send_frames(frames)
        return event_out

    def hello(self, name: str = "krita-sdxl cli") -> dict[str, Any]:
        """The service's ``welcome``, within ``timeout`` seconds in all: heartbeat replies keep
        ``receive`` waiting, so a hello the service never answers would otherwise wait forever."""
        self.send("hello", client=name)
        sent = time.monotonic()
        while True:
            left = sent + self.timeout - time.monotonic()
            if left <= 0 and self._last_heard <= sent:
                raise ServiceUnavailable(self._silence_text(self.timeout))
            if left <= 0:
                raise ServiceUnavailable(
                    f"{self.endpoint} answers heartbeats but not hello within {self.timeout:g} s; try again"
                )
            event = self._next(left)
            if event is None:
                continue
            if event.type == "welcome":
                return event.fields
            if event.type == "error":
                raise JobFailed(event)

    def submit(self, image: Image, mask: Image | None = None, job: str | None = None, **params: Any) -> str:
        job = job or self.new_job_id()
        images = {"image": image}
        if mask is not None:
            images["mask"] = mask
        for frames in self._streams.submit(images, job=job, **params):  # checked now, sent in its turn
            self._send_frames(frames)
        return job

    def events(self, job: str, timeout: float | None = None) -> Iterator[Message]:
        """Events of one job until its final one (result, error or cancelled), which is yielded last.
        ``timeout`` bounds the silence between two events, not the whole job. After a reconnect, a
        silence, or ``status_interval`` s without news, the service is asked about the job; JobLost
        when it no longer knows it (twice, half a second apart: a result may be on its way)."""
        wait = self.timeout if timeout is None else timeout
        start = time.monotonic()
        ask_at, asked, unknown = start + self.status_interval, 0.0, 0
        while True:
            now = time.monotonic()
            if self._reconnected or (now >= ask_at and now - asked > self.status_interval):
                self._reconnected = False
                self.send("status", job=job)
                ask_at, asked = now + self.status_interval, now
            left = max(start, self._last_heard) + wait - now
            if left <= 0:
                raise ServiceUnavailable(self._silence_text(wait))
            event = self._next(left)
            if self._streams.downloading(job) or self._streams.waiting(job):  # arriving, or not sent yet
                ask_at, unknown = time.monotonic() + self.status_interval, 0
            if event is None:
                continue
            if event.type == "status":
                asked = 0.0
                if _mentions(event, job) or self._streams.downloading(job) or self._streams.waiting(job):
                    ask_at, unknown = time.monotonic() + self.status_interval, 0
                    continue
                unknown += 1
                if unknown >= 2:
                    raise JobLost(
                        f"the service restarted; job lost (the service at {self.endpoint} no longer knows job {job})"
                    )
                ask_at = time.monotonic() + 0.5
                continue
            if event.job != job:
                continue
            ask_at, unknown = time.monotonic() + self.status_interval, 0
            yield event
            if event.type in ("result", "error", "cancelled"):
                return

    def run(
        self,
        image: Image,
        on_event: Callable[[Message], None] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Message:
        """Submit one job and wait for its result; raises JobFailed on error or cancel."""
        mask = params.pop("mask", None)
        job = self.submit(image, mask=mask, **params)
        for event in self.events(job, timeout):
            if on_event is not None:
                on_event(event)
            if event.type == "result":
                return event
            if event.type in ("error", "cancelled"):
                raise JobFailed(event)
        raise AssertionError("unreachable")

    def cancel(self, job: str) -> None:
        """Cancel a job (one still waiting here for its upload's turn is forgotten; the service answers
        ``unknown_job`` for it)."""
        self._streams.cancel(job)
        self.send("cancel", job=job)

    def unload(self, model: str) -> dict[str, Any]:
        """Ask the service to free a model ("base" or "refiner"); returns the ``unloaded`` event's fields."""
        self.send("unload", model=model)
        while True:
            event = self.receive()
            if event.type == "unloaded":
                return event.fields
            if event.type == "error" and event.job is None:
                raise JobFailed(event)


def _mentions(status: Message, job: str) -> bool:
    f = status.fields
    return f.get("running") == job or any(isinstance(j, dict) and j.get("job") == job for j in f.get("jobs") or [])


def wait_for_service(endpoint: str, timeout: float = 30.0) -> dict[str, Any]:
    """Hello until the service answers; returns its welcome fields."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with ServiceClient(endpoint, timeout=1.0) as c:
                return c.hello()
        except (ServiceUnavailable, EndpointError):  # EndpointError: its ipc socket is not there yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
