"""Who may connect: loopback and ipc are open; any other address needs ZeroMQ CURVE (or --insecure).

CURVE keys are the ones pyzmq's ``zmq.auth`` writes: ``NAME.key`` (public, shareable) and
``NAME.key_secret`` (secret). The service authorizes every client public key found in a folder (ZAP:
backend/service/zap.py and authorized.py). CURVE needs libzmq 4.3.3 or later (CVE-2019-13132, CVE-2020-15166).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85

from krita_sdxl.protocol.endpoint import EndpointError, parse_endpoint

log = logging.getLogger(__name__)

MIN_LIBZMQ = (4, 3, 3)  # CURVE server stack overflow (< 4.3.2) and CURVE/ZAP denial of service (< 4.3.3)


class SecurityError(ValueError):
    pass


def is_local_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address."""
    try:
        return parse_endpoint(endpoint, bind=True).is_local
    except EndpointError:
        return False


@dataclass(frozen=True)
class CurveConfig:
    secret_key: Path  # the service's NAME.key_secret
    authorized_keys: Path  # folder of client NAME.key files

    def check(self) -> None:
        if zmq.zmq_version_info()[:3] < MIN_LIBZMQ:
            raise SecurityError(
                f"libzmq {zmq.zmq_version()} has known CURVE vulnerabilities; CURVE needs libzmq 4.3.3 or later "
                "(upgrade pyzmq)"
            )
        if not self.secret_key.is_file():
            raise SecurityError(
                f"CURVE secret key {self.secret_key} does not exist; create one with: krita-sdxl keys --name server"
            )
        try:
            _, secret = zmq.auth.load_certificate(str(self.secret_key))
        except (OSError, ValueError) as exc:
            raise SecurityError(f"CURVE secret key {self.secret_key} cannot be read: {exc}") from None
        if not secret:
            raise SecurityError(
                f"{self.secret_key} is a public key file (it holds no secret key): pass the service's "
                "NAME.key_secret file to --curve-secret-key, and give clients the NAME.key file"
            )
        if not self.authorized_keys.is_dir():
            raise SecurityError(
                f"authorized keys folder {self.authorized_keys} does not exist; "
                "put the public .key file of every client allowed to connect there"
            )


def check_exposure(endpoint: str, curve: CurveConfig | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without authentication, unless told to."""
    if curve is not None:
        curve.check()
        return
    if is_local_endpoint(endpoint):
        return
    if not insecure:
        raise SecurityError(
            f"refusing to listen on {endpoint}: it is reachable from other machines and no authentication is "
            "configured. Create keys with `krita-sdxl keys`, then pass --curve-secret-key and --authorized-keys "
            "(or use a loopback/ipc endpoint; --insecure overrides this check)"
        )
    log.warning("!" * 72)
    log.warning("INSECURE: listening on %s without authentication; anyone who can reach it can use your GPU", endpoint)
    log.warning("!" * 72)


def apply_curve(socket: zmq.Socket, curve: CurveConfig) -> None:
    """Make ``socket`` a CURVE server with the service's keys. Which clients get in is the ZAP
    handler's decision (backend/service/zap.py, bound in the socket's context before it binds);
    every message of an admitted client carries ``KEY#TOKEN`` as the frame property ``User-Id``."""
    public, secret = zmq.auth.load_certificate(str(curve.secret_key))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def write_keys(folder: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600 from its creation) in ``folder``
    (created 0700), in the format zmq.auth reads. An existing pair is replaced only with ``force``."""
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name.startswith("."):
        raise SecurityError(f"key name {name!r}: use letters, digits, -, _ and .")
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [p for p in (public, secret) if os.path.lexists(p)]
    if existing and not force:
        raise SecurityError(
            f"{existing[0]} already exists; pass --force to replace the key pair (everyone who trusts the old "
            "public key must then be given the new one)"
        )
    import time

    from krita_sdxl.backend.common.safe_files import write_atomic

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    pub, sec = (k.decode("ascii") for k in zmq.curve_keypair())
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    body = f'metadata\ncurve\n    public-key = "{pub}"\n'
    write_atomic(public, f"#   krita-sdxl CURVE public key, {stamp}: give it to the other side\n\n{body}".encode())
    secret_text = f'#   krita-sdxl CURVE SECRET key, {stamp}: keep it private\n\n{body}    secret-key = "{sec}"\n'
    write_atomic(secret, secret_text.encode(), 0o600)
    return public, secret


def client_curve(socket: zmq.Socket, server_public_key: str | bytes, client_secret_file: Path) -> None:
    """Configure a client socket for CURVE (before connect)."""
    public, secret = zmq.auth.load_certificate(str(client_secret_file))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_public_key.encode() if isinstance(server_public_key, str) else server_public_key


def authorize_key(folder: Path, public_key: str, name: str | None = None, force: bool = False) -> Path:
    """Write a client's Z85 public key as ``folder/NAME.key`` (the format zmq.auth reads). ``name``
    None: named after the key, so every client gets its own file. An existing file with another key
    is replaced only with ``force``; the same key again is a no-op."""
    key = public_key.strip().strip("'\"")
    if len(key) != 40:
        raise SecurityError(f"a CURVE public key is 40 Z85 characters, got {len(key)}")
    try:
        raw = zmq.utils.z85.decode(key)
    except Exception:
        raise SecurityError("that is not a Z85-encoded key") from None
    name = name or f"client-{raw.hex()[:16]}"
    if not name.replace("-", "").replace("_", "").isalnum():
        raise SecurityError(f"key name {name!r}: use letters, digits, - and _")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{name}.key"
    if os.path.lexists(path):
        try:
            same = zmq.auth.load_certificate(str(path))[0] == key.encode("ascii")
        except (OSError, ValueError):
            same = False
        if same:
            return path
        if not force:
            raise SecurityError(f"{path} already holds another client's key; choose another --name or pass --force")
    from krita_sdxl.backend.common.safe_files import write_atomic

    write_atomic(path, f'#   krita-sdxl authorized client key\ncurve\n    public-key = "{key}"\n'.encode())
    return path
