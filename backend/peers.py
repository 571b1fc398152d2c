"""Liveness of connected clients (the ZeroMQ guide's heartbeating): who was heard from, and when.

Clients send a message (at least a ``heartbeat``) every second or so while connected. A client not
heard from for ``timeout`` seconds has vanished: the service cancels its jobs and forgets it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Peers:
    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._last: dict[bytes, float] = {}

    def seen(self, client: bytes) -> None:
        self._last[client] = self._clock()

    def expired(self) -> list[bytes]:
        """Clients silent for longer than the timeout; they are forgotten."""
        limit = self._clock() - self.timeout
        gone = [c for c, t in self._last.items() if t < limit]
        for c in gone:
            del self._last[c]
        return gone

    def __contains__(self, client: bytes) -> bool:
        return client in self._last

    def __len__(self) -> int:
        return len(self._last)
