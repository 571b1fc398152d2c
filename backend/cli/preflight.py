"""What ``serve`` checks before it loads the model (minutes with the real refiner): the endpoint,
exposure and keys, that the address can be bound, the device, and that a checkpoint file is one.

The real bind still happens in the Service after the load; the test bind here uses a private ZeroMQ
context that is terminated at once, so the port is free again (libzmq sets SO_REUSEADDR).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import zmq

from krita_sdxl.backend.common.config import ConfigError, Settings
from krita_sdxl.backend.service.security import CurveConfig, SecurityError, check_exposure
from krita_sdxl.protocol.endpoint import Endpoint, EndpointError, check_ipc_bind, parse_endpoint

MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors format's own limit on its JSON header


def curve_config(settings: Settings) -> CurveConfig | None:
    if not (settings.curve_secret_key or settings.authorized_keys):
        return None
    if not (settings.curve_secret_key and settings.authorized_keys):
        raise ConfigError("CURVE needs both --curve-secret-key and --authorized-keys")
    return CurveConfig(Path(settings.curve_secret_key).expanduser(), Path(settings.authorized_keys).expanduser())


def bind_problem(endpoint: Endpoint, exc: zmq.ZMQError) -> str:
    """One line for a failed bind, with what to do."""
    where = f"cannot listen on {endpoint.text}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use (another krita-sdxl serve?); stop that or choose another --endpoint"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {endpoint.host} is not an address of this machine; use 127.0.0.1, or this machine's address"
    if exc.errno == errno.ENODEV:
        return f"{where}: this machine has no network interface or address {endpoint.host!r}"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need special rights; use a higher port)"
    return f"{where}: {exc.strerror or exc}"


def try_bind(endpoint: Endpoint) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.bind(endpoint.text)
    except zmq.ZMQError as exc:
        raise ConfigError(bind_problem(endpoint, exc)) from None
    finally:
        sock.close(linger=0)
        ctx.term()  # waits until the listening socket is really closed


def check_checkpoint(model: str) -> None:
    """A .safetensors file must have a readable header whose tensors fit in the file."""
    path = Path(model).expanduser()
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return
    bad = f"{path} is not a usable .safetensors checkpoint"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= length <= min(size - 8, MAX_SAFETENSORS_HEADER):
                raise ConfigError(f"{bad}: its header is broken (is it a partial download? fetch it again)")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{bad}: its header is not valid JSON (is it another kind of file?)") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{bad}: its header is not a table of tensors")
    ends = [v["data_offsets"][1] for v in header.values() if isinstance(v, dict) and "data_offsets" in v]
    if not ends:
        raise ConfigError(f"{bad}: it holds no tensors")
    if 8 + length + max(ends) > size:
        raise ConfigError(f"{bad}: it is cut short ({size} bytes, needs {8 + length + max(ends)}); fetch it again")


def check_device(device: str) -> None:
    from krita_sdxl.backend.models.refiner import pick_device

    try:
        pick_device(device)
    except ValueError as exc:
        raise ConfigError(f"{exc}; use --device auto (or cpu)") from None


def check_upscaler(settings: Settings) -> None:
    """An ``--upscaler`` file is an upscaler model (a second or two, before minutes of model loading)."""
    from krita_sdxl.backend.engine.loading import upscaler

    upscaler(settings)


def check_serve(settings: Settings) -> CurveConfig | None:
    """Everything ``serve`` can find wrong before the model loads; ConfigError names it."""
    curve = curve_config(settings)
    try:
        endpoint = parse_endpoint(settings.endpoint, bind=True)
        if curve is not None or endpoint.is_local or not settings.insecure:  # (--insecure warns in Service)
            check_exposure(endpoint.text, curve, settings.insecure)
        check_ipc_bind(endpoint)
    except (EndpointError, SecurityError) as exc:
        raise ConfigError(str(exc)) from None
    if settings.admin_keys and not Path(settings.admin_keys).expanduser().is_dir():
        raise ConfigError(
            f"admin keys folder {settings.admin_keys} does not exist; put the public .key file of every client "
            "that may unload models from another machine there (krita-sdxl authorize KEY --dir FOLDER)"
        )
    if endpoint.scheme in ("tcp", "ipc"):
        try_bind(endpoint)
    if not settings.identity:
        check_device(settings.device)
        if not settings.demo:
            check_checkpoint(settings.model)
            check_checkpoint(settings.base_model)
        check_upscaler(settings)
    return curve


def check_local(settings: Settings) -> None:
    """``refine --local``: the device and checkpoint checks, before the model loads."""
    check_device(settings.device)
    if not settings.demo:
        check_checkpoint(settings.model)
        check_checkpoint(settings.base_model)
    check_upscaler(settings)
