"""The service's connections as the kernel sees them: accepted, closed, and which one a message came from.

libzmq's ROUTER routes by routing id and says nothing when the connection that holds an id ends; a
socket monitor does (``EVENT_ACCEPTED`` and ``EVENT_DISCONNECTED`` carry the descriptor), and every
message says which descriptor it came from (``ZMQ_SRCFD``). From these, in the I/O thread:

- **Closed connections.** ``drain`` reads the monitor and returns the descriptors closed since the
  last call. libzmq emits ``EVENT_DISCONNECTED`` before it releases the connection's routing id, so
  a ``drain`` just before a send sees a close that could let another peer take the id.
- **Stale messages.** A message can be read after its connection closed (libzmq delivers what had
  arrived), and the descriptor may already belong to a new connection. With CURVE every handshake
  gets a *token* from the ZAP handler (backend/service/zap.py), issued after a ``drain``: a message
  whose token was issued before the last close of its descriptor comes from a closed connection.
- **A cap.** At most ``max_connections`` connections: beyond it, the oldest connection that has not
  sent a message yet is closed, or else the new one. A connection that sends no message within
  ``hello_grace`` seconds of being accepted is closed (idle sockets hold no slot for long).

Closing is ``shutdown()`` on the descriptor (libzmq sees the peer go and cleans up); a descriptor is
only shut down when it is still one of this service's connections.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import parse_monitor_message

from .intake import IntakeGuard
from .ratelog import RateLimitedLog

log = logging.getLogger(__name__)

EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


@dataclass
class Conn:
    fd: int
    accepted: float
    messages: int = 0


class Connections:
    def __init__(
        self,
        router: zmq.Socket,
        max_connections: int,
        hello_grace: float,
        guard: IntakeGuard | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self.hello_grace = hello_grace
        self.guard = guard
        self._clock = clock
        # The monitor's pipe is unbounded: libzmq's I/O thread blocks on a full one (no event is lost,
        # but nothing moves until it is read), and 1,000 connections in a burst would fill the default.
        address = f"inproc://krita-sdxl-monitor-{id(self):x}"
        router.monitor(address, EVENTS)
        self._monitor = router.context.socket(zmq.PAIR)
        self._monitor.setsockopt(zmq.LINGER, 0)
        self._monitor.setsockopt(zmq.RCVHWM, 0)
        self._monitor.connect(address)
        self.local: int | str | None = None  # the listening port (tcp) or path (ipc): our connections' own address
        self.seq = 0  # monitor events processed so far
        self._open: OrderedDict[int, Conn] = OrderedDict()  # in the order accepted
        self._closed_at: dict[int, int] = {}  # fd -> seq of its last close
        self._tokens: OrderedDict[int, int] = OrderedDict()  # CURVE handshake token -> seq when issued
        self._next_token = 0
        self._rejected = RateLimitedLog(log)
        self._doomed: list[tuple[float, Conn]] = []  # connections to close once their last answer is out
        self.refused = 0  # connections refused or closed by the cap and the grace

    @property
    def monitor(self) -> zmq.Socket:
        return self._monitor

    def listening_on(self, endpoint: str) -> None:
        """The bound endpoint (tcp://HOST:PORT or ipc://PATH): a descriptor is shut down only when its
        local address is this one (never a descriptor libzmq has closed and the process reused)."""
        if endpoint.startswith("tcp://"):
            self.local = int(endpoint.rsplit(":", 1)[1])
        elif endpoint.startswith("ipc://"):
            self.local = endpoint[len("ipc://") :]

    def __len__(self) -> int:
        return len(self._open)

    # -- events -----------------------------------------------------------------------------------

    def drain(self) -> list[int]:
        """Read the monitor; returns the descriptors closed since the last call."""
        closed = []
        while True:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return closed
            except zmq.ZMQError:
                return closed
            event = parse_monitor_message(frames)
            self.seq += 1
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                if self._open.pop(fd, None) is not None:
                    closed.append(fd)
                self._closed_at[fd] = self.seq
                if self.guard is not None:
                    self.guard.closed(fd)

    def _accepted(self, fd: int) -> None:
        if len(self._open) >= self.max_connections:
            idle = next((c for c in self._open.values() if c.messages == 0), None)
            if idle is None:
                self._rejected.warning(
                    "refused a connection: %d connections are open, the limit (--max-connections)", len(self._open)
                )
                self.refused += 1
                self.close(fd, track=False)
                return
            self._rejected.warning("closed the oldest connection that never sent a message, to admit a new one")
            self.close(idle.fd)
        self._open[fd] = Conn(fd, self._clock())
        if self.guard is not None:
            self.guard.opened(fd)

    # -- messages and tokens ----------------------------------------------------------------------

    def issue_token(self) -> int:
        """A token for a CURVE handshake the ZAP handler admits (call ``drain`` first)."""
        self._next_token += 1
        self._tokens[self._next_token] = self.seq
        while len(self._tokens) > 8 * self.max_connections + 1024:
            self._tokens.popitem(last=False)  # long-gone handshakes: a message with one is stale
        return self._next_token

    def message(self, fd: int, token: int | None, frame_sizes: list[int]) -> bool:
        """A message read from ``fd`` (with its CURVE token, if any): counts it, and says whether its
        connection is still open (False: it was read after its connection closed)."""
        if fd < 0:
            return True  # no descriptor (an inproc peer): nothing to track
        conn = self._open.get(fd)
        if conn is not None:
            conn.messages += 1
            if self.guard is not None:
                self.guard.read(fd, frame_sizes)
        if token is None:
            return conn is not None
        issued = self._tokens.get(token)
        return issued is not None and self._closed_at.get(fd, -1) < issued

    def is_open(self, fd: int) -> bool:
        return fd in self._open

    # -- closing ------------------------------------------------------------------------------------

    def close_soon(self, fd: int, delay: float = 0.5) -> None:
        """Close ``fd``'s connection in ``delay`` seconds (the answer just sent to it goes out first)."""
        conn = self._open.get(fd)
        if conn is not None:
            self._doomed.append((self._clock() + delay, conn))

    def housekeeping(self) -> None:
        """Close connections that sent nothing within the grace, and those doomed whose time has come."""
        now = self._clock()
        due = [c for t, c in self._doomed if t <= now]
        self._doomed = [(t, c) for t, c in self._doomed if t > now]
        for conn in due:
            if self._open.get(conn.fd) is conn:  # still that connection (a descriptor is reused)
                self.close(conn.fd)
        limit = now - self.hello_grace
        for conn in list(self._open.values()):
            if conn.accepted > limit:
                break  # the rest were accepted later
            if conn.messages == 0:
                self._rejected.warning(
                    "closed a connection that sent no message within %.0f s of connecting", self.hello_grace
                )
                self.refused += 1
                self.close(conn.fd)

    def close(self, fd: int, track: bool = True) -> bool:
        """Shut a connection down (libzmq then closes it and frees what it held for it)."""
        if track and fd not in self._open:
            return False
        return shutdown(fd, self.local)


def shutdown(fd: int, local: int | str | None) -> bool:
    """``shutdown(SHUT_RDWR)`` on ``fd`` if it is a stream socket bound to ``local`` (our listening
    port, or our ipc path); the descriptor itself stays libzmq's. False if it is not."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        if sock.type != socket.SOCK_STREAM:
            return False
        name = sock.getsockname()
        if isinstance(local, int):
            if not (isinstance(name, tuple) and len(name) >= 2 and name[1] == local):
                return False
        elif isinstance(local, str):
            here = name.decode(errors="replace") if isinstance(name, bytes) else name
            if here != local:
                return False
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.detach()
