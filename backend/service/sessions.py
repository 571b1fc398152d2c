"""Who a message comes from, and who may receive a job's events: routing ids and CURVE keys.

- A routing id must be unguessable: at least 16 bytes, not starting with a zero byte (libzmq gives a
  socket without ``ZMQ_ROUTING_ID`` the predictable id ``00`` + a counter). Such clients are answered
  with a ``bad_identity`` error and never get work queued.
- The ROUTER runs with ``ROUTER_HANDOVER`` off: a peer that connects with a live client's id is not
  given that id (libzmq leaves its connection unrouted); ZMTP heartbeats free a dead peer's id.
- With CURVE, a routing id is bound to the key of the first client that used it, for as long as that
  client is alive (heartbeat timeout). A message from another key with the same id is refused, and
  the first client's events stop going to that id until its own key is heard on it again.
- Events go to a routing id only while its owner's own connection holds it (:class:`Sessions`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .jobs import Owner

MIN_ROUTING_ID_BYTES = 16


def routing_id_problem(routing: bytes) -> str | None:
    """Why ``routing`` is not an acceptable routing id (the text of the error), or None."""
    if len(routing) >= MIN_ROUTING_ID_BYTES and routing[:1] != b"\0":
        return None
    if len(routing) < MIN_ROUTING_ID_BYTES:
        why = f"is only {len(routing)} bytes long"
    else:
        why = "starts with a zero byte, like the predictable ids libzmq assigns itself"
    return (
        f"refused: this client's ZeroMQ routing id {why}, so another program could guess it and take over "
        f"its jobs. Set ZMQ_ROUTING_ID on the DEALER socket to {MIN_ROUTING_ID_BYTES} or more random bytes "
        "(not starting with a zero byte; e.g. b'k' + secrets.token_bytes(16)) before connecting"
    )


TAKEN = (
    "refused: this routing id is in use by another client (another CURVE key). Set ZMQ_ROUTING_ID on the "
    f"DEALER socket to {MIN_ROUTING_ID_BYTES} or more random bytes of your own"
)


@dataclass
class Session:
    key: bytes  # the CURVE key that owns the routing id (b"" without CURVE)
    fd: int | None  # the descriptor of the owner's live connection (from its messages)
    attached: bool  # the owner's connection is open: its events may go to the routing id


class Sessions:
    """routing id -> the session of the client (CURVE key) that uses it, and whether its connection is open.

    A job's events go to its routing id only while the owner's connection is *attached*: a message from
    the owner on an open connection attaches it; the close of that connection (the socket monitor:
    backend/service/connections.py) detaches it, before libzmq could give the id to anyone else. A
    detached owner's events are held for it (a result, a job's end) or dropped (progress), and sent
    when it is back on a new connection with the same id and key. A message from another key with the
    same id is refused and detaches the owner too (the id's connection is not the owner's).
    """

    def __init__(self) -> None:
        self._sessions: dict[bytes, Session] = {}

    def bind(self, routing: bytes, key: bytes, fd: int | None, alive: bool) -> tuple[str | None, bool]:
        """A message from ``key`` through ``routing`` on ``fd`` (``alive``: its connection is still open).
        Returns the refusal text if another key owns the id, and whether the owner has just (re)attached."""
        session = self._sessions.get(routing)
        if session is None:
            self._sessions[routing] = Session(key, fd if alive else None, alive)
            return None, alive
        if session.key != key:
            session.attached = False
            return TAKEN, False
        if not alive:  # a message its closed connection had sent: it still counts, but attaches nothing
            return None, False
        back = not session.attached
        session.fd, session.attached = fd, True
        return None, back

    def closed(self, fd: int) -> list[bytes]:
        """The owner's connection on ``fd`` has closed: its routing ids get nothing until it is back."""
        gone = []
        for routing, session in self._sessions.items():
            if session.fd == fd and session.attached:
                session.attached = False
                gone.append(routing)
        return gone

    def may_send(self, owner: Owner) -> bool:
        """Events of ``owner``'s jobs may go to its routing id now (its own connection holds it)."""
        session = self._sessions.get(owner.routing)
        return session is not None and session.key == owner.key and session.attached

    def forget(self, routing: bytes) -> None:
        self._sessions.pop(routing, None)

    def routings_of(self, keys: frozenset[bytes]) -> list[bytes]:
        return [r for r, s in self._sessions.items() if s.key in keys]

    def __len__(self) -> int:
        return len(self._sessions)
