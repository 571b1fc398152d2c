"""This computer's CURVE key pair, for a backend on another machine. Created once, on demand.

The secret key file is created with mode 0600 in a 0700 folder in one step (``os.open`` with
``O_CREAT | O_EXCL``), never created readable and tightened afterwards: another user on the machine
cannot read it, not even for an instant. It is written under a temporary name and renamed, so a
half-written key file never exists. The format is the one ``zmq.auth`` reads and writes.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

KEY_NAME = "krita_sdxl_refiner"

_HEADER = "#   ****  Generated on {date} by krita-sdxl  ****\n#   ZeroMQ CURVE {kind} Certificate\n"
_SECRET_NOTE = "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n"


def _certificate(public: bytes, secret: bytes | None) -> str:
    date = datetime.datetime.now().isoformat(timespec="seconds")
    kind = "**Secret**" if secret else "Public"
    text = _HEADER.format(date=date, kind=kind) + (_SECRET_NOTE if secret else "") + "\nmetadata\ncurve\n"
    text += f'    public-key = "{public.decode("ascii")}"\n'
    if secret:
        text += f'    secret-key = "{secret.decode("ascii")}"\n'
    return text


def _write_new(path: Path, text: str, mode: int) -> None:
    """Write ``path`` atomically: a fresh temporary file created with ``mode``, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_client_keys(folder: Path) -> Path:
    """Return the secret key file in ``folder``, creating the pair (NAME.key, NAME.key_secret) if absent."""
    import zmq

    secret = folder / f"{KEY_NAME}.key_secret"
    if secret.is_file():
        return secret
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o077:
        os.chmod(folder, 0o700)  # a folder made by an older version
    public_key, secret_key = zmq.curve_keypair()
    _write_new(secret, _certificate(public_key, secret_key), 0o600)
    _write_new(folder / f"{KEY_NAME}.key", _certificate(public_key, None), 0o644)
    return secret


def public_key_text(secret_file: str | Path) -> str:
    """The 40-character Z85 public key of a key file, to paste into ``krita-sdxl authorize``; "" if unreadable."""
    from zmq import auth as zmq_auth

    try:
        public, _ = zmq_auth.load_certificate(str(secret_file))
    except (OSError, ValueError):
        return ""
    return public.decode("ascii") if public else ""
