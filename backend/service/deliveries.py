"""Undelivered previews: bytes of sent preview images that ZeroMQ has not taken off the service's hands.

(Results travel in chunks under the client's credit: backend/service/transfers.py.) A preview frame
goes to the ROUTER zero-copy with a pyzmq ``MessageTracker``. ZeroMQ releases the buffer once it has
written the frame to the client's connection (or dropped it: the peer is gone or its queue is full).
Until then the bytes count against the client's budget in the queue (``JobQueue.hold``/``release``),
so a client that does not read cannot make the service hold more for it. Only the tracker is kept
here: a live ``zmq.Frame`` would keep its own reference to the buffer, and the tracker would never
finish.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

from .jobs import JobQueue


class Deliveries:
    def __init__(self, queue: JobQueue) -> None:
        self._queue = queue
        self._pending: list[tuple[bytes, int, zmq.MessageTracker]] = []

    def wrap(self, account: bytes, frames: Sequence[Any]) -> list[zmq.Frame]:
        """Tracked, zero-copy frames for ``frames`` (zmq frames or buffers), counted against ``account``."""
        out = []
        for frame in frames:
            buf = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
            tracked = zmq.Frame(buf, track=True, copy=False)
            tracker = tracked.tracker
            assert tracker is not None
            self._queue.hold(account, buf.nbytes)
            self._pending.append((account, buf.nbytes, tracker))
            out.append(tracked)
        return out

    def poll(self) -> None:
        """Release the bytes ZeroMQ has taken since the last poll."""
        keep = []
        for account, nbytes, tracker in self._pending:
            if tracker.done:
                self._queue.release(account, nbytes)
            else:
                keep.append((account, nbytes, tracker))
        self._pending = keep

    def pending_of(self, account: bytes) -> int:
        """Bytes of ``account``'s previews ZeroMQ has not taken yet."""
        return sum(n for a, n, _ in self._pending if a == account)

    @property
    def pending_bytes(self) -> int:
        return sum(n for _, n, _ in self._pending)

    def __len__(self) -> int:
        return len(self._pending)
