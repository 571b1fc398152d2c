"""The connection to the service as the workflow sees it: its states, CURVE keys and the port it talks through.

``adapters.client.Client`` (ZeroMQ on Qt's event loop) implements :class:`Connection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from krita_sdxl.protocol import Image
from krita_sdxl.protocol.endpoint import DEFAULT_ENDPOINT, EndpointError, parse_endpoint

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


Z85 = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
KEY_CHARS = 40  # a CURVE public key in Z85 text


def settings_problems(endpoint: str, server_public_key: str, client_secret_file: str) -> list[str]:
    """Why these connection settings cannot work, one line each for the artist ([]: they can be used).
    An empty endpoint means the default one; empty keys mean a backend on this computer."""
    problems = []
    try:
        parse_endpoint(endpoint.strip() or DEFAULT_ENDPOINT)
    except EndpointError as exc:
        problems.append(f"Endpoint: {exc}")
    key, secret = server_public_key.strip(), client_secret_file.strip()
    if key and len(key) != KEY_CHARS:
        problems.append(
            f"Server key: {len(key)} characters; it is the {KEY_CHARS} between the quotes of public-key in the "
            "service's server.key"
        )
    elif key and not set(key) <= Z85:
        wrong = "".join(sorted(set(key) - Z85))
        problems.append(f"Server key: {wrong!r} cannot be in a key (copy the {KEY_CHARS} characters of server.key)")
    if secret and not key:
        problems.append("Client key: it needs the server key too (leave both empty for a backend on this computer)")
    elif secret and not Path(secret).is_file():
        problems.append(f"Client key: there is no file {secret} (leave it empty: the plugin makes its own)")
    return problems


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
