"""A blocking DEALER client for the CLI, tests and benchmarks (the Krita plugin has its own, on Qt)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
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

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 10.0, ctx: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = ctx or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
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
        self.socket.send_multipart(encode(CLIENT, msg_type, images=images, **fields), copy=False)

    def receive(self, timeout: float | None = None) -> Message:
        """Next event from the service; ServiceUnavailable when none arrives in time."""
        wait = self.timeout if timeout is None else timeout
        if not self.socket.poll(int(wait * 1000), zmq.POLLIN):
            raise ServiceUnavailable(
                f"no answer from {self.endpoint} within {wait:g} s: is `krita-sdxl serve` running there?"
            )
        return decode(SERVICE, self.socket.recv_multipart(copy=False))

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
