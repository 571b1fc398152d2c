"""A blocking DEALER client for the CLI, tests and benchmarks (the Krita plugin has its own, on Qt)."""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq

from krita_sdxl.protocol import CLIENT, SERVICE, Image, Message, decode, encode

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5588"


class ServiceUnavailable(ConnectionError):
    pass


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
        ``server_key`` + ``client_secret_file``: CURVE, for a service beyond loopback."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self._ctx = ctx or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.ROUTING_ID, b"k" + secrets.token_bytes(16))  # unguessable: nobody takes our jobs
        self.socket.setsockopt(zmq.LINGER, 0)
        if server_key is not None and client_secret_file is not None:
            from .security import client_curve

            client_curve(self.socket, server_key, client_secret_file)
        self.socket.connect(endpoint)
        self._prefix = f"{os.getpid()}-{id(self):x}-"

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_job_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def send(self, msg_type: str, images: dict[str, Image] | None = None, **fields: Any) -> None:
        """Queue one message; never blocks (ServiceUnavailable when ZeroMQ cannot queue it)."""
        frames = encode(CLIENT, msg_type, images=images, **fields)
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise ServiceUnavailable(f"cannot reach {self.endpoint}: no connection to a service") from None

    def receive(self, timeout: float | None = None) -> Message:
        """Next event from the service (heartbeat replies are consumed here). While waiting, a heartbeat
        goes out every ``heartbeat_interval`` so the service knows this client is alive; ServiceUnavailable
        when nothing at all, not even a heartbeat reply, arrives for ``timeout`` seconds."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServiceUnavailable(
                    f"no answer from {self.endpoint} within {wait:g} s: is `krita-sdxl serve` running there?"
                )
            if self.socket.poll(int(min(left, self.heartbeat_interval) * 1000) + 1, zmq.POLLIN):
                event = decode(SERVICE, self.socket.recv_multipart(copy=False))
                if event.type != "heartbeat":
                    return event
                deadline = time.monotonic() + wait
            else:
                try:
                    self.send("heartbeat")
                except ServiceUnavailable:
                    pass  # still connecting or reconnecting; the deadline decides

    def hello(self, name: str = "krita-sdxl cli") -> dict[str, Any]:
        self.send("hello", client=name)
        while True:
            event = self.receive()
            if event.type == "welcome":
                return event.fields
            if event.type == "error":
                raise JobFailed(event)

    def submit(self, image: Image, mask: Image | None = None, job: str | None = None, **params: Any) -> str:
        job = job or self.new_job_id()
        images = {"image": image}
        if mask is not None:
            images["mask"] = mask
        self.send("submit", images=images, job=job, **params)
        return job

    def events(self, job: str, timeout: float | None = None) -> Iterator[Message]:
        """Events of one job until its final one (result, error or cancelled), which is yielded last.
        ``timeout`` bounds the silence between two events, not the whole job."""
        while True:
            event = self.receive(timeout)
            if event.job != job:
                continue
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


def wait_for_service(endpoint: str, timeout: float = 30.0) -> dict[str, Any]:
    """Hello until the service answers; returns its welcome fields."""
    deadline = time.monotonic() + timeout
    while True:
        with ServiceClient(endpoint, timeout=1.0) as c:
            try:
                return c.hello()
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    raise
