"""ZeroMQ endpoints: the one place where an address typed by a person is checked (stdlib only).

Used by the service (bind), the CLI and blocking client (connect) and the Krita plugin (connect).

- ``tcp://HOST:PORT`` (``PORT`` may be ``*`` to bind a free one), ``ipc://PATH``, ``inproc://NAME``.
- ``ipc`` alone means this user's private socket: ``$XDG_RUNTIME_DIR/krita-sdxl/service.sock``, or a
  0700 folder ``krita-sdxl-UID`` in the temporary folder when there is no runtime folder.
- An ``ipc://`` path is a file other local users may create first (socket squatting). A client
  connects only to a socket its own user owns (:func:`check_ipc_connect`); the service refuses to
  replace a live socket or one another user owns (:func:`check_ipc_bind`).
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5588"  # the service's address unless told otherwise (loopback: no keys needed)
SCHEMES = ("tcp", "ipc", "inproc")
IPC_SOCKET_NAME = "service.sock"
MAX_IPC_PATH = 107  # sun_path is 108 bytes on Linux (104 on macOS) including the terminating NUL


class EndpointError(ValueError):
    """An endpoint that cannot be used; the message says what is wrong and what to write instead."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # tcp, ipc or inproc
    address: str  # tcp: HOST:PORT; ipc: the path; inproc: the name

    @property
    def text(self) -> str:
        return f"{self.scheme}://{self.address}"

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]") if self.scheme == "tcp" else ""

    @property
    def port(self) -> str:
        return self.address.rsplit(":", 1)[1] if self.scheme == "tcp" else ""

    @property
    def path(self) -> Path | None:
        return Path(self.address) if self.scheme == "ipc" and not self.address.startswith("@") else None

    @property
    def is_local(self) -> bool:
        """True for ipc, inproc and tcp on a loopback address (not reachable from other machines)."""
        if self.scheme in ("ipc", "inproc"):
            return True
        host = self.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False  # "*", an interface name or a host name: not provably loopback

    def __str__(self) -> str:
        return self.text


def parse_endpoint(text: str, bind: bool = False) -> Endpoint:
    """Check an endpoint as typed; EndpointError names the problem. ``bind``: port ``*`` is allowed."""
    if not isinstance(text, str) or not text.strip():
        raise EndpointError("the endpoint is empty; use e.g. tcp://127.0.0.1:5588 or ipc")
    raw = text.strip()
    if raw == "ipc":
        return Endpoint("ipc", str(default_ipc_dir(create=False) / IPC_SOCKET_NAME))
    scheme, sep, rest = raw.partition("://")
    if not sep:
        hint = f"tcp://{raw}" if ":" in raw else f"tcp://{raw}:5588"
        raise EndpointError(f"endpoint {raw!r} has no scheme; did you mean {hint}?")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise EndpointError(f"endpoint {raw!r}: unknown scheme {scheme!r}; use tcp://HOST:PORT or ipc://PATH")
    if not rest:
        raise EndpointError(f"endpoint {raw!r} has nothing after {scheme}://")
    if scheme == "tcp":
        return Endpoint("tcp", _check_tcp(raw, rest, bind))
    if scheme == "ipc":
        if rest.startswith("@"):
            if not rest[1:]:
                raise EndpointError(f"endpoint {raw!r}: an abstract ipc socket needs a name after @")
        elif len(os.fsencode(rest)) > MAX_IPC_PATH:
            raise EndpointError(
                f"endpoint {raw!r}: the socket path is {len(os.fsencode(rest))} bytes; the limit is {MAX_IPC_PATH}"
            )
        return Endpoint("ipc", rest)
    return Endpoint("inproc", rest)


def _check_tcp(raw: str, rest: str, bind: bool) -> str:
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise EndpointError(f"endpoint {raw!r} needs a host and a port, e.g. tcp://127.0.0.1:5588")
    if "/" in port or "/" in host:
        raise EndpointError(f"endpoint {raw!r}: a tcp endpoint has no path; write tcp://HOST:PORT")
    if port == "*":
        if not bind:
            raise EndpointError(f"endpoint {raw!r}: port * only works when listening; give the port number")
    else:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise EndpointError(f"endpoint {raw!r}: port {port!r} is not a number from 1 to 65535")
        port = str(int(port))
    if host.startswith("[") != host.endswith("]"):
        raise EndpointError(f"endpoint {raw!r}: unbalanced brackets around an IPv6 address")
    if host.count(":") and not host.startswith("["):
        raise EndpointError(f"endpoint {raw!r}: write an IPv6 address in brackets, e.g. tcp://[::1]:5588")
    return f"{host}:{port}"


# --- ipc sockets: private folder, ownership --------------------------------------------------


def _uid() -> int | None:
    getuid = getattr(os, "getuid", None)
    return getuid() if getuid is not None else None  # None on Windows: no ownership checks there


def default_ipc_dir(create: bool = True) -> Path:
    """This user's private folder for ipc sockets (mode 0700), created when ``create``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    uid = _uid()
    if runtime and os.path.isdir(runtime) and _owned_private(Path(runtime), uid):
        folder = Path(runtime) / "krita-sdxl"
    else:
        folder = Path(tempfile.gettempdir()) / f"krita-sdxl-{uid if uid is not None else getpass.getuser()}"
    if create:
        ensure_private_dir(folder)
    return folder


def ensure_private_dir(folder: Path) -> Path:
    """Create ``folder`` with mode 0700, or check that an existing one is ours and private."""
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    uid = _uid()
    if uid is None:
        return folder
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise EndpointError(f"{folder} should be a private folder but is a link or a file; remove it")
    if info.st_uid != uid:
        raise EndpointError(f"{folder} belongs to another user (uid {info.st_uid}); remove it or use another path")
    if info.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


def _owned_private(folder: Path, uid: int | None) -> bool:
    if uid is None:
        return True
    try:
        info = os.stat(folder)
    except OSError:
        return False
    return info.st_uid == uid and not info.st_mode & 0o022


def _owner_text(uid: int) -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def socket_is_live(path: Path) -> bool:
    """True when a process accepts connections on the Unix socket at ``path``."""
    family = getattr(socket, "AF_UNIX", None)
    if family is None:
        return False
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def check_ipc_connect(endpoint: Endpoint) -> None:
    """Before a client connects: the socket must exist and belong to this user (no squatter)."""
    path = endpoint.path
    uid = _uid()
    if path is None or uid is None:
        return
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise EndpointError(f"no service is listening on {endpoint.text} (the socket does not exist)") from None
    except OSError as exc:
        raise EndpointError(f"cannot use {endpoint.text}: {exc.strerror}") from None
    if info.st_uid != uid:
        raise EndpointError(
            f"the socket {path} belongs to {_owner_text(info.st_uid)}, not to you: another user may be "
            "impersonating the service, so nothing is sent there. Use a socket in a private folder (--endpoint ipc)"
        )
    if not stat.S_ISSOCK(info.st_mode):
        raise EndpointError(f"{path} is not a socket")


def check_ipc_bind(endpoint: Endpoint) -> None:
    """Before the service binds: refuse a live socket (another service) and one another user owns.
    A stale socket of this user is left for ZeroMQ to replace; the private default folder is created."""
    path = endpoint.path
    if path is None:
        return
    uid = _uid()
    if path.parent == default_ipc_dir(create=False):
        ensure_private_dir(path.parent)
    elif not path.parent.is_dir():
        raise EndpointError(f"cannot listen on {endpoint.text}: the folder {path.parent} does not exist")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if uid is not None and info.st_uid != uid:
        raise EndpointError(
            f"cannot listen on {endpoint.text}: {path} already exists and belongs to {_owner_text(info.st_uid)}. "
            "Another user may be impersonating the service; use a socket in a private folder (--endpoint ipc)"
        )
    if not stat.S_ISSOCK(info.st_mode):
        raise EndpointError(f"cannot listen on {endpoint.text}: {path} exists and is not a socket")
    if socket_is_live(path):
        raise EndpointError(
            f"cannot listen on {endpoint.text}: another service is already listening there "
            "(stop it first, or choose another --endpoint)"
        )


__all__ = [
    "SCHEMES",
    "Endpoint",
    "EndpointError",
    "check_ipc_bind",
    "check_ipc_connect",
    "default_ipc_dir",
    "ensure_private_dir",
    "parse_endpoint",
    "socket_is_live",
]
