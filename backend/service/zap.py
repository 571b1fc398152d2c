"""The service's ZAP handler (ZeroMQ authentication), answered in the I/O thread.

libzmq asks it about every CURVE handshake on the service's socket (RFC 27: ``inproc://zeromq.zap.01``
in the socket's context; without a handler CURVE would admit anyone). It admits the client keys in
the authorized keys (backend/service/authorized.py) and gives each admitted handshake a ``User-Id``
of ``KEY#TOKEN``: the client's Z85 public key and a token that names this one connection
(backend/service/connections.py), so the service can tell a message of a closed connection from one
of a live connection of the same key. In the I/O thread, the token's issue is ordered with the
connection events the service has seen; no other thread takes part.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq
import zmq.utils.z85

from .authorized import AuthorizedKeys

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
TOKEN_SEPARATOR = b"#"


def split_user_id(user_id: bytes) -> tuple[bytes, int | None]:
    """(the client's Z85 key, its connection token) from a message's ``User-Id``."""
    key, sep, token = user_id.rpartition(TOKEN_SEPARATOR)
    if not sep or not token.isdigit():
        return user_id, None
    return key, int(token)


class ZapHandler:
    def __init__(self, ctx: zmq.Context, keys: AuthorizedKeys, issue: Callable[[], int]) -> None:
        """``issue``: a token for an admitted handshake (the connections' ``drain`` then ``issue_token``)."""
        self.keys = keys
        self._issue = issue
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)

    def handle(self) -> None:
        """Answer every waiting request."""
        while True:
            try:
                request = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self._answer(request)
            except Exception:  # never leave libzmq waiting: refuse
                log.exception("ZAP: could not judge a handshake; refused")
                reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"internal error", b"", b""]
            self.socket.send_multipart(reply)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            return [b"1.0", b"", b"500", b"malformed request", b"", b""]
        version, request_id, domain, _address, _identity, mechanism, *credentials = request
        if version != b"1.0":
            return [b"1.0", request_id, b"500", b"unknown ZAP version", b"", b""]
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return [b"1.0", request_id, b"400", b"CURVE keys are required", b"", b""]
        key = zmq.utils.z85.encode(credentials[0])
        if not self.keys.callback(domain.decode("utf-8", "replace"), key):
            return [b"1.0", request_id, b"400", b"unauthorized key", b"", b""]
        user_id = key + TOKEN_SEPARATOR + str(self._issue()).encode("ascii")
        return [b"1.0", request_id, b"200", b"OK", user_id, b""]

    def close(self) -> None:
        self.socket.close(linger=0)
