"""Liveness of connected clients (the ZeroMQ guide's heartbeating): who was heard from, and when.

Clients send a message (at least a ``heartbeat``) every second or so while connected. A client not
heard from for ``timeout`` seconds has vanished: the service cancels its jobs and forgets it.
Kept in the order last heard from, so finding the vanished ones costs nothing per live client.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class Peers:
    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._last: OrderedDict[bytes, float] = OrderedDict()

    def seen(self, client: bytes) -> None:
        self._last[client] = self._clock()
        self._last.move_to_end(client)

    def expired(self) -> list[bytes]:
        """Clients silent for longer than the timeout; they are forgotten."""
        limit = self._clock() - self.timeout
        gone = []
        while self._last:
            client, last = next(iter(self._last.items()))
            if last >= limit:
                break
            del self._last[client]
            gone.append(client)
        return gone

    def forget(self, client: bytes) -> None:
        self._last.pop(client, None)

    def __contains__(self, client: bytes) -> bool:
        return client in self._last

    def __len__(self) -> int:
        return len(self._last)
