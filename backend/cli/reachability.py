"""Why a service does not answer, said within seconds: what the ZeroMQ connection monitor saw, a host name
that does not resolve, and a peer that is not a ZeroMQ service (told apart from one that wants CURVE keys).

ZeroMQ retries a refused connection for ever and silently; a peer that is not ZeroMQ (an HTTP server on the
port) holds the handshake for 30 s. :class:`Reachability` watches the monitor's events: no connection within
``GRACE`` seconds means nothing listens there; a connection without a finished handshake is probed once with a
ZMTP greeting of its own (:func:`probe`), which a ZeroMQ service answers with its greeting and mechanism.
A service that has answered the handshake is never judged here: its slowness is the timeout's business.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import zmq

from krita_sdxl.protocol.endpoint import Endpoint

GRACE = 2.0  # seconds: no connection (or no handshake) by then, and the reason is told
PROBE_TIMEOUT = 2.0
EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
# ZMTP 3.0 greeting, NULL mechanism, as a client: signature, version 3.0, mechanism, as-server 0, filler
_GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31


@dataclass(frozen=True)
class Greeting:
    """What a peer sent back to :func:`probe`: a ZMTP greeting (``mechanism``), or other bytes."""

    zmtp: bool
    mechanism: str = ""  # NULL, PLAIN or CURVE
    first: bytes = b""  # the first bytes, when not ZMTP

    @property
    def looks_like_http(self) -> bool:
        """A status line, or a bare HTML error page (HTTP/0.9-style: the answer to a request line it cannot parse)."""
        return self.first.lstrip().lower().startswith((b"http/", b"<!doctype html", b"<html"))


def probe(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT) -> Greeting | None:
    """Connect once with a plain socket, send a ZMTP greeting and read the answer; None when no
    connection could be made or nothing came back in time."""
    if endpoint.scheme == "tcp":
        family, address = socket.AF_UNSPEC, (endpoint.host, int(endpoint.port))
    elif endpoint.scheme == "ipc" and endpoint.path is not None and hasattr(socket, "AF_UNIX"):
        family, address = socket.AF_UNIX, str(endpoint.path)
    else:
        return None
    try:
        if family == socket.AF_UNSPEC:
            conn = socket.create_connection(address, timeout=timeout)  # type: ignore[arg-type]
        else:
            conn = socket.socket(family, socket.SOCK_STREAM)
            conn.settimeout(timeout)
            conn.connect(address)
    except OSError:
        return None
    data = b""
    with conn:
        try:
            conn.sendall(_GREETING + b"\r\n\r\n")  # the blank line makes an HTTP server answer at once
            deadline = time.monotonic() + timeout
            while len(data) < 64 and time.monotonic() < deadline:
                conn.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = conn.recv(64 - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    if not data:
        return None  # silence tells nothing (a busy machine, or a peer that waits): the timeout decides
    if len(data) >= 10 and data[0] == 0xFF and data[9] == 0x7F:
        mechanism = data[12:32].rstrip(b"\0").decode("ascii", "replace") if len(data) >= 32 else ""
        return Greeting(True, mechanism)
    return Greeting(False, first=data[:16])


def resolves(host: str, timeout: float = GRACE) -> str | None:
    """None when ``host`` resolves (or cannot be checked in time); else the resolver's reason."""
    found: list[str | None] = []

    def look() -> None:
        try:
            socket.getaddrinfo(host, None)
            found.append(None)
        except OSError as exc:
            found.append(str(getattr(exc, "strerror", None) or exc))

    worker = threading.Thread(target=look, daemon=True)
    worker.start()
    worker.join(timeout)
    return found[0] if found else None


class Reachability:
    """The connection attempts to one endpoint, from the monitor's events; :meth:`verdict` says why nothing
    answers, once ``GRACE`` seconds have passed without a handshake (or at once, with ``now=None``)."""

    def __init__(self, endpoint: Endpoint, curve: bool) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.started = time.monotonic()
        self.connected = self.handshaken = False
        self.retries = 0
        self._probed: Greeting | None = None
        self._judged = False

    def seen(self, kind: int) -> None:
        if kind == zmq.EVENT_CONNECTED:
            self.connected = True
        elif kind == zmq.EVENT_CONNECT_RETRIED:
            self.retries += 1
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.handshaken = True

    def wait_left(self) -> float:
        """Seconds until a verdict is due (a long time once it is: the caller's own pace then)."""
        left = self.started + GRACE - time.monotonic()
        return 3600.0 if self.handshaken or left <= 0 else left + 0.01

    def verdict(self, forced: bool = False) -> str | None:
        """Why nothing answers, or None (the service answered; it is too early; or a ZeroMQ service holds
        the handshake, so the timeout decides)."""
        if self.handshaken or (not forced and time.monotonic() < self.started + GRACE):
            return None
        if not self.connected:
            return self._nothing_answers()
        greeting = self._greeting()
        if greeting is None or greeting.zmtp:
            return None
        return self._not_zeromq(greeting)

    def handshake_failed(self) -> str | None:
        """A handshake the peer broke off: the reason when the peer is not a ZeroMQ service; None when it is
        (then the mechanism or the keys are the problem, as the caller says)."""
        greeting = self._greeting()
        return self._not_zeromq(greeting) if greeting is not None and not greeting.zmtp else None

    def _greeting(self) -> Greeting | None:
        if not self._judged:
            self._probed, self._judged = probe(self.endpoint), True
        return self._probed

    def _nothing_answers(self) -> str:
        where = self.endpoint.text
        host = self.endpoint.host
        if self.endpoint.scheme == "tcp" and not _is_address(host):
            why = resolves(host)
            if why is not None:
                return f"the host name {host!r} in {where} does not resolve ({why}): check the name, or use the address"
        if self.endpoint.scheme == "ipc":
            detail = "the socket file is there, but nothing listens on it"
        elif self.retries:
            detail = "connection refused" if self.endpoint.is_local else "no connection: refused or unreachable"
        else:
            detail = f"no connection within {GRACE:g} s"
        return f"nothing answers at {where} — is `krita-sdxl serve` running? ({detail})"

    def _not_zeromq(self, greeting: Greeting) -> str:
        what = "it answered like an HTTP server" if greeting.looks_like_http else "it does not speak ZeroMQ"
        return (
            f"something answers at {self.endpoint.text}, but not a krita-sdxl service ({what}): check the address "
            "and port (`krita-sdxl serve` listens on tcp://127.0.0.1:5588 unless told otherwise)"
        )


def _is_address(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
