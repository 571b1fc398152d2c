"""How refine and info reach a service: the client settings (flags, ``[client]``, ``[serve]``'s endpoint)
checked, the CURVE keys loaded, and a :class:`ServiceClient` made; nothing is sent here."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from krita_sdxl.backend.common.config import CommandFailed, ConfigError

from .options import ClientChoice, resolve_client


def client_keys(choice: ClientChoice) -> dict[str, Any]:
    """ServiceClient's CURVE arguments from the server key and client key settings, checked."""
    import zmq.auth
    import zmq.utils.z85

    s = choice.settings
    if not s.server_key and not s.client_key:
        return {}
    server, client = choice.named("server_key"), choice.named("client_key")
    if not s.server_key or not s.client_key:
        raise ConfigError(f"CURVE needs both {server} (the service's public key) and {client} (yours)")
    key = s.server_key.strip()
    if Path(key).expanduser().is_file():
        try:
            key = zmq.auth.load_certificate(str(Path(key).expanduser()))[0].decode("ascii")
        except (OSError, ValueError):
            raise ConfigError(f"{server} {s.server_key}: no public key in that file") from None
    try:
        valid = len(key) == 40 and len(zmq.utils.z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError, TypeError):
        valid = False
    if not valid:
        raise ConfigError(f"{server}: expected the service's 40-character public key, or its .key file")
    secret_file = Path(s.client_key).expanduser()
    try:
        secret = zmq.auth.load_certificate(str(secret_file))[1]
    except (OSError, ValueError):
        secret = None
    if not secret:
        raise ConfigError(f"{client} {s.client_key}: no secret key there; give a NAME.key_secret file")
    return {"server_key": key, "client_secret_file": secret_file}


def connect(args: argparse.Namespace) -> Any:
    """A ServiceClient for the endpoint and keys: ConfigError for what was typed wrong (exit 2),
    CommandFailed when the service cannot be used (its ipc socket is missing or not yours: exit 1)."""
    from krita_sdxl.protocol.endpoint import EndpointError

    from .client import ServiceClient

    choice = resolve_client(args)
    keys = client_keys(choice)
    try:
        return ServiceClient(choice.settings.endpoint, timeout=choice.settings.timeout, **keys)
    except EndpointError as exc:
        raise CommandFailed(str(exc)) from None
