"""Who a message comes from, and who may receive a job's events: routing ids and CURVE keys.

- A routing id must be unguessable: at least 16 bytes, not starting with a zero byte (libzmq gives a
  socket without ``ZMQ_ROUTING_ID`` the predictable id ``00`` + a counter). Such clients are answered
  with a ``bad_identity`` error and never get work queued.
- The ROUTER runs with ``ROUTER_HANDOVER`` off: a peer that connects with a live client's id is not
  given that id (libzmq leaves its connection unrouted); ZMTP heartbeats free a dead peer's id.
- With CURVE, a routing id is bound to the key of the first client that used it, for as long as that
  client is alive (heartbeat timeout). A message from another key with the same id is refused, and
  the first client's events stop going to that id until its own key is heard on it again.
"""

from __future__ import annotations

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


class Sessions:
    """routing id -> the CURVE key (b"" without CURVE) of the live client that uses it."""

    def __init__(self) -> None:
        self._keys: dict[bytes, bytes] = {}
        self._contested: set[bytes] = set()  # ids another key tried to use: the owner's events are held back

    def bind(self, routing: bytes, key: bytes) -> str | None:
        """Record that ``key`` speaks through ``routing``; the refusal text if another key owns it."""
        bound = self._keys.setdefault(routing, key)
        if bound != key:
            self._contested.add(routing)
            return TAKEN
        self._contested.discard(routing)
        return None

    def may_send(self, owner: Owner) -> bool:
        """Events of ``owner``'s jobs may go to its routing id (nobody else holds it)."""
        return owner.routing not in self._contested and self._keys.get(owner.routing, owner.key) == owner.key

    def forget(self, routing: bytes) -> None:
        self._keys.pop(routing, None)
        self._contested.discard(routing)

    def routings_of(self, keys: frozenset[bytes]) -> list[bytes]:
        return [r for r, k in self._keys.items() if k in keys]

    def __len__(self) -> int:
        return len(self._keys)
