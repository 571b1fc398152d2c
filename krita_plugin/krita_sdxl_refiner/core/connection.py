"""The connection to the service as the workflow sees it: its states, CURVE keys and the port it talks through.

``adapters.client.Client`` (ZeroMQ on Qt's event loop) implements :class:`Connection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from krita_sdxl.protocol import Image

from .signals import SignalLike


class ConnectionState(str, Enum):
    invalid = "invalid"  # the endpoint as typed cannot be used: not connecting until it is changed
    disconnected = "disconnected"  # no answer (yet); retrying by itself
    connecting = "connecting"  # socket open, hello sent, no welcome yet
    connected = "connected"  # welcome received, heartbeats answered


@dataclass(frozen=True)
class CurveKeys:
    """ZeroMQ CURVE for a backend beyond this machine: the service's public key (Z85 text, as in its
    ``.key`` file) and this client's secret key file (``NAME.key_secret`` from ``krita-sdxl keys``)."""

    server_public_key: str
    client_secret_file: str

    @classmethod
    def from_settings(cls, server_public_key: str, client_secret_file: str) -> CurveKeys | None:
        if not server_public_key.strip() and not client_secret_file.strip():
            return None
        return cls(server_public_key.strip(), client_secret_file.strip())


class Connection(Protocol):
    """Signals: ``state_changed(state, detail)``, ``welcomed(server, capabilities)``, ``received(Message)``
    (every event but welcome and heartbeat; ``credit`` events tell a submit's upload progress, a
    ``result`` comes with all its pixels), ``problem(text)``."""

    state_changed: SignalLike
    welcomed: SignalLike
    received: SignalLike
    problem: SignalLike
    server: str
    capabilities: dict[str, Any]

    @property
    def state(self) -> ConnectionState: ...
    @property
    def detail(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def is_connected(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def set_endpoint(self, endpoint: str) -> None: ...
    def set_curve(self, curve: CurveKeys | None) -> None: ...
    def reconnect(self, reason: str) -> None: ...
    def send(self, msg_type: str, images: dict[str, Image] | None = None, **fields: Any) -> bool: ...
