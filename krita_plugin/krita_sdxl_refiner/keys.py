"""This computer's CURVE key pair, for a backend on another machine. Created once, on demand."""

from __future__ import annotations

from pathlib import Path

KEY_NAME = "krita_sdxl_refiner"


def ensure_client_keys(folder: Path) -> Path:
    """Return the secret key file in ``folder``, creating the pair (NAME.key, NAME.key_secret) if absent."""
    from zmq import auth as zmq_auth

    secret = folder / f"{KEY_NAME}.key_secret"
    if not secret.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        zmq_auth.create_certificates(str(folder), KEY_NAME)
        secret.chmod(0o600)
    return secret


def public_key_text(secret_file: str | Path) -> str:
    """The 40-character Z85 public key of a key file, to paste into ``krita-sdxl authorize``; "" if unreadable."""
    from zmq import auth as zmq_auth

    try:
        public, _ = zmq_auth.load_certificate(str(secret_file))
    except (OSError, ValueError):
        return ""
    return public.decode("ascii") if public else ""
