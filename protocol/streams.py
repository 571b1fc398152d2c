"""A client's side of the pixel streams (transfer.py), without sockets: shared by the command-line client
and the Krita plugin (stdlib + msgpack, Python 3.10).

- A connection uploads one job at a time: ``submit`` queues the job's header and pixels here and gives
  back what to send now (its header, when no other upload is under way); the service's ``credit``
  events say which chunks go next. Once the last chunk is sent (the service reads a connection's
  messages in order), or the job ends early (``error``, ``cancelled``), the next job's header goes.
- A ``result`` is assembled from its ``chunk`` events, each acknowledged with a ``credit``; the caller
  gets the result (with its pixels) once the last chunk is in. A second ``result`` for the same job
  (after a reconnection) starts it again.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .codec import CLIENT, Message, encode, stream_buffers, stream_specs
from .images import Image
from .transfer import Incoming, Outgoing

Frames = list[Any]


class ClientStreams:
    def __init__(self) -> None:
        self._waiting: deque[tuple[str, Frames, Outgoing]] = deque()  # submits waiting for their turn
        self._upload: tuple[str, Outgoing] | None = None  # the job whose pixels are going up
        self._downloads: dict[str, tuple[Message, Incoming]] = {}  # results whose pixels are coming

    # -- uploads ------------------------------------------------------------------------------------

    def submit(self, images: dict[str, Image], **fields: Any) -> list[Frames]:
        """Queue a submit (its fields are checked now, as the service will); the messages to send now."""
        frames = encode(CLIENT, "submit", images=images, **fields)
        job = str(fields["job"])
        self._waiting.append((job, frames, Outgoing(job, stream_buffers("submit", images))))
        return self._next()

    def _next(self) -> list[Frames]:
        if self._upload is not None or not self._waiting:
            return []
        job, frames, upload = self._waiting.popleft()
        self._upload = (job, upload)
        return [frames]

    def cancel(self, job: str) -> bool:
        """Forget a submit still waiting for its turn (True: it was; the service never heard of it)."""
        before = len(self._waiting)
        self._waiting = deque(w for w in self._waiting if w[0] != job)
        return len(self._waiting) != before

    def uploading(self, job: str) -> tuple[int, int] | None:
        """(bytes the service holds, bytes in all) of a job still uploading or waiting to; else None."""
        if self._upload is not None and self._upload[0] == job:
            return self._upload[1].acked, self._upload[1].total
        for waiting, _, upload in self._waiting:
            if waiting == job:
                return 0, upload.total
        return None

    def reconnected(self) -> None:
        """A new connection: chunks in flight on the old one are lost (the service sends the credit of
        an upload it still has again, and a result still on its way from its start)."""
        if self._upload is not None:
            upload = self._upload[1]
            upload.sent = upload.acked
        self._downloads.clear()

    # -- events ---------------------------------------------------------------------------------------

    def on_event(self, event: Message) -> tuple[Message | None, list[Frames]]:
        """(the event to hand on, or None while a result is incomplete; the messages to send now)."""
        job = event.job or ""
        if event.type == "credit":
            if self._upload is None or self._upload[0] != job:
                return event, []
            upload = self._upload[1]
            upload.grant(event["received"], event["until"])
            send = [encode(CLIENT, "chunk", payload=data, job=job, offset=offset) for offset, data in upload.chunks()]
            if upload.sent >= upload.total:  # all sent: the service reads the next submit after the last chunk
                self._upload = None
                send += self._next()
            return event, send
        if event.type == "result":
            self._downloads[job] = (event, Incoming(job, stream_specs(event)))
            return None, []
        if event.type == "chunk":
            got = self._downloads.get(job)
            if got is None:
                return None, []  # a result this client has given up on
            result, incoming = got
            incoming.put(event["offset"], event.payload)
            ack = [encode(CLIENT, "credit", job=job, received=incoming.received)]
            if not incoming.done:
                return None, ack
            del self._downloads[job]
            result.images = incoming.images()
            return result, ack
        send: list[Frames] = []
        if event.type in ("accepted", "error", "cancelled") and self._upload is not None and self._upload[0] == job:
            self._upload = None
            send = self._next()
        if event.type in ("error", "cancelled"):
            self._downloads.pop(job, None)
        return event, send

    def downloading(self, job: str) -> bool:
        return job in self._downloads

    def waiting(self, job: str) -> bool:
        return any(w[0] == job for w in self._waiting)
