"""Before joining a Ray cluster: is its head there, does it answer, does it want a token, and have we one.

``ray.init`` waits for ever on a head whose gcs_server is stopped, and after 24 s of retries says only
"is `ray start --head` running there?" when the cluster wants a token this host does not send. One gRPC
call to the head's GCS, with a deadline, tells these cases apart in milliseconds; each gets one line that
says what to do (ConfigError).

Tokens (Ray 2.60): a cluster started with ``RAY_AUTH_MODE=token`` (or by ``ray start --head`` on a machine
that has a token, which turns it on) refuses every call without ``authorization: Bearer TOKEN``. Ray reads
the token from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, but it
sends it to an explicit ``--ray-address`` only when ``RAY_AUTH_MODE=token`` is set. When the head asks for a
token and this host has one, the service turns token mode on for itself (as Ray does for ``auto``) and
checks the head takes it.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from krita_sdxl.backend.common.config import ConfigError

log = logging.getLogger("krita_sdxl.pool")

PROBE_TIMEOUT_S = 5.0  # a head that answers nothing in this time is stopped or swamped
AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_SETUP = (
    "copy the head's ~/.ray/auth_token to this host (mode 600), or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH; "
    "see the README's GPU pool section"
)


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, for messages: RAY_AUTH_TOKEN, a file path


def find_token() -> Token | None:
    """The token Ray would send, from where Ray looks (same order); ConfigError for a RAY_AUTH_TOKEN_PATH
    that cannot be read (Ray itself would abort the process)."""
    env = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if env:
        return Token(env, "RAY_AUTH_TOKEN")
    path_text = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    if path_text:
        value = _first_line(Path(path_text))
        if not value:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path_text}: the file cannot be read or is empty")
        return Token(value, path_text)
    default = Path(os.environ.get("HOME") or Path.home()) / ".ray" / "auth_token"
    value = _first_line(default)
    return Token(value, str(default)) if value else None


def _first_line(path: Path) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return ""


def resolve(address: str) -> str:
    """HOST:PORT of the head's GCS (``auto``: the cluster ``ray start`` left on this machine)."""
    from ray._private.services import canonicalize_bootstrap_address

    hint = "start one with `ray start --head`, or leave out --ray-address to start a local Ray"
    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise ConfigError(f"--ray-address {address}: {exc} ({hint})") from None
    if resolved is None:
        raise ConfigError(f"--ray-address {address}: no running Ray cluster found on this machine ({hint})")
    return resolved


def check_reachable(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """The head accepts a TCP connection on its GCS port; ConfigError names the address otherwise."""
    host, _, port = address.rpartition(":")
    hint = "is `ray start --head` running there, and does the firewall let this host in?"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {exc} ({hint})") from None


def probe(address: str, token: Token | None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """One call to the head's GCS (its cluster id). None when it answers; else ``unauthenticated``,
    ``no answer`` (the deadline passed) or another gRPC status, with its details."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token.value}")] if token is not None else None
    channel = grpc.insecure_channel(address)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        request = gcs_service_pb2.GetClusterIdRequest()  # pyright: ignore[reportAttributeAccessIssue]
        stub.GetClusterId(request, timeout=timeout, metadata=metadata)
        return None
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else None  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return "unauthenticated"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "no answer"
        details = exc.details() if callable(getattr(exc, "details", None)) else ""  # type: ignore[attr-defined]
        return f"{getattr(code, 'name', code)}: {details}"
    finally:
        channel.close()


def token_mode() -> bool:
    return os.environ.get(AUTH_MODE, "").lower() == "token"


def enable_token_mode() -> None:
    """Send the token from here on, in this process and the Ray processes it starts (Ray's own switch)."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()


def check_head(address: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """Before ``ray.init(address)``: the head is reachable and answers, and takes this host's token if it
    wants one (turning token mode on when this host has one). Returns the resolved HOST:PORT; ConfigError
    (one line, what to do) otherwise."""
    resolved = resolve(address)
    check_reachable(resolved, timeout)
    if os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true"):
        return resolved  # a TLS cluster: the probe speaks plain gRPC; ray.init (bounded) tells the rest
    token = find_token()
    sent = token if token_mode() else None
    problem = probe(resolved, sent, timeout)
    if problem == "no answer":
        raise ConfigError(
            f"the Ray head at {resolved} accepts connections but does not answer within {timeout:g} s: its "
            "gcs_server is stopped or overloaded (check `ray status` on the head)"
        )
    if problem == "unauthenticated":
        if sent is not None:
            raise ConfigError(
                f"the Ray cluster at {resolved} refused this host's token (from {sent.source}): it is not the "
                f"cluster's token; {TOKEN_SETUP}"
            )
        if os.environ.get(AUTH_MODE, "").lower() == "disabled":
            raise ConfigError(
                f"the Ray cluster at {resolved} uses token authentication, and {AUTH_MODE}=disabled is set here: "
                f"unset it; {TOKEN_SETUP}"
            )
        if token is None:
            raise ConfigError(
                f"the Ray cluster at {resolved} uses token authentication and this host has no token: {TOKEN_SETUP}"
            )
        problem = probe(resolved, token, timeout)
        if problem == "unauthenticated":
            raise ConfigError(
                f"the Ray cluster at {resolved} uses token authentication and refused this host's token (from "
                f"{token.source}): it is not the cluster's token; {TOKEN_SETUP}"
            )
        if problem is None:
            log.info("pool: the Ray cluster at %s uses token authentication: sending the token from %s", resolved,
                     token.source)  # fmt: skip
            enable_token_mode()
    if problem is not None:
        raise ConfigError(
            f"the Ray cluster at {resolved} did not answer as a Ray head ({problem}): is {resolved} the head's "
            "GCS port (`ray start --head --port`, 6379 by default)?"
        )
    return resolved
