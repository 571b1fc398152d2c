"""Pixel streams: a submit's or a result's images sent in bounded chunks under credit (stdlib only).

No ZeroMQ message carries more than one frame of at most ``MAX_CHUNK_BYTES`` after its header, so a
frame always arrives within the heartbeat timeout, even on a slow link, and a receiver never buffers
more than one chunk of a message it cannot see yet. The images of a message travel as one byte
stream (the first image's bytes, then the next one's, in the schema's order: ``STREAMED_SLOTS``).

Flow control, credit-based as in the ZeroMQ guide's file transfer ("Fileio"):

- upload (client to service): the service answers a ``submit`` with ``credit`` (``received``: bytes
  it holds, ``until``: the sender may send bytes up to that offset); every chunk it stores brings a
  new credit, and the last one ``accepted``. The service grants credit to one upload of a
  connection at a time, at most ``WINDOW_BYTES`` beyond what it has received.
- download (service to client): ``result`` carries the image spec; ``chunk`` events follow, never
  more than ``WINDOW_BYTES`` beyond what the client has acknowledged with ``credit`` (``received``).

:class:`Outgoing` is the sending side of one stream, :class:`Incoming` the receiving side; both are
pure (no sockets) and shared by the service, the command-line client and the Krita plugin.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import FRAME_MISMATCH, LIMIT, ProtocolError
from .images import Image, ImageSpec

MAX_CHUNK_BYTES = 1024 * 1024  # the largest payload frame of any message (a chunk, a preview): 1 MiB
WINDOW_BYTES = 4 * MAX_CHUNK_BYTES  # the most bytes of one stream a sender has in flight beyond its credit


def zeroed(nbytes: int) -> Any:
    """A writable zero-filled buffer of ``nbytes`` whose pages are only committed once written
    (an anonymous mapping), so an announced stream costs memory only as its bytes arrive."""
    if nbytes <= 0:
        return bytearray(0)
    return mmap.mmap(-1, nbytes)


class Outgoing:
    """The sending side of one stream: which bytes go next, within the receiver's credit."""

    def __init__(self, job: str, buffers: Sequence[Any]) -> None:
        self.job = job
        self._views = [memoryview(b).cast("B") for b in buffers]
        self.total = sum(v.nbytes for v in self._views)
        self.sent = 0  # bytes handed to the socket
        self.acked = 0  # bytes the receiver says it holds
        self.until = 0  # the sender may send bytes up to this offset

    @property
    def done(self) -> bool:
        """The receiver holds every byte."""
        return self.acked >= self.total

    def grant(self, received: int, until: int) -> None:
        """The receiver's credit (an upload's ``credit`` event): it holds ``received`` bytes and
        takes bytes up to ``until``. Credit never shrinks: an old credit arriving late is ignored."""
        self.acked = max(self.acked, min(received, self.total))
        self.until = max(self.until, min(until, self.total))

    def ack(self, received: int) -> None:
        """The receiver holds ``received`` bytes (a download's ``credit``): the window moves on."""
        if not 0 <= received <= self.sent:
            raise ProtocolError(
                FRAME_MISMATCH, f"credit for {received} bytes, but only {self.sent} were sent", "received", self.job
            )
        self.grant(received, received + WINDOW_BYTES)

    def restart(self) -> None:
        """Send everything again from the first byte (the receiver lost what was in flight)."""
        self.sent = self.acked = 0
        self.until = min(self.total, WINDOW_BYTES)

    def chunks(self, size: int = MAX_CHUNK_BYTES) -> Iterator[tuple[int, memoryview]]:
        """(offset, bytes) of the chunks the credit allows now; each is counted as sent when taken."""
        size = max(1, min(size, MAX_CHUNK_BYTES))
        while self.sent < self.until:
            offset = self.sent
            n = min(size, self.until - offset)
            self.sent += n
            yield offset, self._slice(offset, n)

    def _slice(self, offset: int, n: int) -> memoryview:
        """``n`` stream bytes from ``offset``; a chunk that spans two images is joined (rare: only at
        the image/mask boundary)."""
        parts = []
        for view in self._views:
            if offset >= view.nbytes:
                offset -= view.nbytes
                continue
            take = min(n, view.nbytes - offset)
            parts.append(view[offset : offset + take])
            n -= take
            offset = 0
            if n == 0:
                break
        return parts[0] if len(parts) == 1 else memoryview(b"".join(parts))


class Incoming:
    """The receiving side of one stream: a buffer the size of its images, filled in order."""

    def __init__(self, job: str, specs: Sequence[tuple[str, ImageSpec]]) -> None:
        self.job = job
        self.specs = list(specs)
        self.total = sum(spec.byte_length for _, spec in self.specs)
        self.buffer = zeroed(self.total)
        self.received = 0

    @property
    def done(self) -> bool:
        return self.received >= self.total

    @property
    def until(self) -> int:
        """The credit to grant: at most ``WINDOW_BYTES`` beyond what has arrived."""
        return min(self.total, self.received + WINDOW_BYTES)

    def put(self, offset: int, data: Any, until: int | None = None) -> None:
        """Store one chunk; ProtocolError (naming ``offset``) for a chunk out of order, beyond the
        stream, or beyond the credit ``until`` the sender was given."""
        n = memoryview(data).nbytes
        if not 0 < n <= MAX_CHUNK_BYTES:
            raise ProtocolError(
                FRAME_MISMATCH, f"a chunk holds 1 to {MAX_CHUNK_BYTES} bytes, this one {n}", "offset", self.job
            )
        if offset != self.received:
            raise ProtocolError(
                FRAME_MISMATCH,
                f"chunk at offset {offset}, but {self.received} bytes have arrived: chunks go in order",
                "offset",
                self.job,
            )
        if offset + n > self.total:
            raise ProtocolError(
                FRAME_MISMATCH,
                f"chunk of {n} bytes at offset {offset} runs past the end of the {self.total}-byte stream",
                "offset",
                self.job,
            )
        if until is not None and offset + n > until:
            raise ProtocolError(
                LIMIT,
                f"chunk of {n} bytes at offset {offset} goes beyond the credit (bytes up to {until}): "
                "wait for a credit event before sending more",
                "offset",
                self.job,
            )
        self.buffer[offset : offset + n] = memoryview(data).cast("B")
        self.received += n

    def images(self) -> dict[str, Image]:
        """The stream's images (views of the buffer, no copy)."""
        out: dict[str, Image] = {}
        view = memoryview(self.buffer)
        start = 0
        for slot, spec in self.specs:
            out[slot] = Image(spec, view[start : start + spec.byte_length])
            start += spec.byte_length
        return out


__all__ = ["MAX_CHUNK_BYTES", "WINDOW_BYTES", "Incoming", "Outgoing", "zeroed"]
