"""The one table of settings: it builds the command-line flags (with help and the default shown), reads
the TOML file and fills :class:`Settings` (``[serve]``) and :class:`ClientSettings` (``[client]``, for
refine and info), checking every value with the option's own validator, whichever way it came in.
Types and defaults come from those two classes."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from krita_sdxl.backend.common.config import (
    ClientSettings,
    ConfigError,
    Settings,
    default_config_path,
    did_you_mean,
    load_toml,
)
from krita_sdxl.backend.speed.levels import CHOICES as SPEED_CHOICES
from krita_sdxl.protocol.endpoint import DEFAULT_ENDPOINT, EndpointError, parse_endpoint
from krita_sdxl.protocol.images import MAX_SIDE
from krita_sdxl.protocol.schema import MAX_PROMPT_CHARS

Check = Callable[[Any], Any]  # returns the value (possibly normalised) or raises ValueError(why)
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # the protocol's largest image


def one_of(*choices: str) -> Check:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return check


def int_range(lo: int, hi: int, what: str = "", multiple: int = 1) -> Check:
    def check(value: int) -> int:
        if not lo <= value <= hi or value % multiple:
            step = f" and a multiple of {multiple}" if multiple > 1 else ""
            raise ValueError(f"must be a whole number from {lo} to {hi}{what}{step}")
        return value

    return check


def float_range(lo: float, hi: float, unit: str) -> Check:
    def check(value: float) -> float:
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"must be a number of {unit} from {lo:g} to {hi:g}")
        return value

    return check


def bind_endpoint(value: str) -> str:
    try:
        return parse_endpoint(value, bind=True).text
    except EndpointError as exc:
        raise ValueError(str(exc)) from None


def connect_endpoint(value: str) -> str:
    try:
        parse_endpoint(value)
    except EndpointError as exc:
        raise ValueError(str(exc)) from None
    return value.strip()


def positive_seconds(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a number of seconds above 0")
    return value


def seconds(text: str) -> float:
    """A flag's number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def pool_name(value: str) -> str:
    from krita_sdxl.backend.pool.plan import check_pool_name

    return check_pool_name(value)


def device_name(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ValueError("must be auto, cuda, cuda:N (a GPU number), mps or cpu")
    return value


def pixel_count(text: str) -> int:
    """A pixel count typed as 4194304 or as 2048x2048."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 0:
        raise argparse.ArgumentTypeError(f"expected a pixel count such as 4194304 or 2048x2048, got {text!r}")
    return parts[0] * parts[-1] if len(parts) == 2 else parts[0]


@dataclass(frozen=True)
class Option:
    name: str  # the Settings field
    help: str
    group: str
    check: Check | None = None
    where: str = "serve"  # serve: serve only; local: serve and refine --local; common: every command
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None  # how a flag's text becomes a value (default: the field's type)
    metavar: str | None = None
    shown: str | None = None  # the default as --help shows it ("" = none shown)
    off_flag: str | None = None  # a setting on by default: the flag that turns it off
    hidden: bool = False
    table: str = "serve"  # the TOML table, and the settings class: serve (Settings), client (ClientSettings)

    @property
    def flag(self) -> str:
        return self.off_flag or "--" + self.name.replace("_", "-")


MODEL, LIMITS, SECURITY, TILES, SERVICE = (
    "model and device",
    "limits",
    "security (needed to listen beyond loopback)",
    "large images and upscales (refined at native size in overlapping tiles)",
    "service",
)
POOL = "GPU pool (several GPUs and hosts behind one endpoint, on Ray Serve: pip install 'krita-sdxl[pool]')"
_LOG_LEVELS = ("debug", "info", "warning", "error")
_MEMORY = ("auto", "none", "balanced", "model", "sequential")

OPTIONS: tuple[Option, ...] = (
    Option("log_level", "how much to log; debug also shows the libraries' warnings and loading bars", SERVICE,
           one_of(*_LOG_LEVELS), where="common", choices=_LOG_LEVELS, shown="info for serve, else warning"),
    Option("endpoint", "where to listen: tcp://HOST:PORT (port * picks a free one), ipc://PATH, or ipc (your "
           "private socket)", SERVICE, bind_endpoint),
    Option("model", "the refiner: a Hugging Face repo id (from the local cache), a diffusers folder or a "
           "single-file .safetensors checkpoint", MODEL, where="local"),
    Option("base_model", "the base model for the generate and two_stage modes, same kinds as --model; loaded "
           "with the first job that needs it ('none': no base)", MODEL, where="local",
           shown="the SDXL 1.0 base if it is in the local cache"),
    Option("model_config", "diffusers config folder for a single-file --model", MODEL, where="local",
           metavar="DIR", shown="the shipped SDXL 1.0 refiner configs"),
    Option("base_model_config", "diffusers config folder for a single-file --base-model", MODEL, where="local",
           metavar="DIR", shown="the shipped SDXL 1.0 base configs"),
    Option("memory", "where weights live: none = all on the GPU; balanced = UNets on the GPU, text encoders and "
           "VAE only while used; model = each model on the GPU only while it runs; sequential = layer by layer "
           "(least memory, slowest); auto = chosen from the free GPU memory. The offload modes need a GPU",
           MODEL, one_of(*_MEMORY), where="local", choices=_MEMORY),
    Option("oom_retry", "when a job runs out of GPU memory, run it once more in the next lower memory mode",
           MODEL, where="local", shown=""),
    Option("watermark", "do not apply the invisible SDXL watermark (applied when invisible-watermark is "
           "installed)", MODEL, where="local", off_flag="--no-watermark", shown=""),
    Option("simulate_oom", "", MODEL, int_range(0, 10**6), where="local", hidden=True),
    Option("demo", "use the tiny random-weight demo model (offline; its pixels are meaningless)", MODEL,
           where="local", shown=""),
    Option("allow_download", "download the model from the Hugging Face Hub if it is not cached", MODEL,
           where="local", shown=""),
    Option("device", "auto = cuda, then mps, then cpu; cuda:N picks a GPU", MODEL, device_name, where="local"),
    Option("dtype", "UNet and text-encoder precision (auto = fp16 on GPUs, fp32 on CPU)", MODEL,
           one_of("auto", "fp16", "bf16", "fp32"), where="local", choices=("auto", "fp16", "bf16", "fp32")),
    Option("cache_dir", "where the demo model is built", MODEL, where="local", metavar="DIR",
           shown="$KRITA_SDXL_CACHE or ~/.cache/krita-sdxl"),
    Option("speed", "speed level: off = plain; compile = torch.compile of the UNet's and the VAE's blocks (on an "
           "H100 up to 0.3 s saved a job, 2.5 min of compiling at the first start, 26 s at later ones); trt = a "
           "TensorRT engine for the refiner UNet per size bucket, built in the background (needs tensorrt); "
           "fp8 = float8 linear layers under compile (needs torchao and an Ada or Hopper GPU); draft = compile "
           "and a step cache (fastest, changes the picture). A level that cannot run steps down (fp8, trt, "
           "compile, off) and says why. auto = compile with CUDA, on = compile", MODEL, one_of(*SPEED_CHOICES),
           where="local", choices=SPEED_CHOICES),
    Option("warmup", "do not compile the speed path at start-up (then the first job compiles)", MODEL,
           off_flag="--no-warmup", shown=""),
    Option("compile_cache", "where compiled kernels are kept for fast restarts", MODEL, where="local",
           metavar="DIR", shown="CACHE_DIR/torch-compile"),
    Option("max_queue", "most jobs queued or running, all clients", LIMITS, int_range(1, 10**6)),
    Option("max_jobs_per_client", "most jobs queued or running per client", LIMITS, int_range(1, 10**6)),
    Option("max_pixels", "largest image (and work size), in pixels or WxH", LIMITS,
           int_range(64 * 64, MAX_PIXELS, f" ({MAX_SIDE}x{MAX_SIDE}, the protocol's limit)"), parse=pixel_count,
           metavar="PIXELS", shown="8192x8192"),
    Option("max_prompt_chars", "longest prompt, in characters", LIMITS,
           int_range(0, MAX_PROMPT_CHARS, " (the protocol's limit)")),
    Option("max_connections", "most connections open at once (beyond it a connection that has sent nothing yet "
           "is closed, or the new one refused); also kept below the open files limit", LIMITS, int_range(16, 10**6)),
    Option("result_ttl", "seconds a result that its client does not read is kept; then it is dropped and the "
           "client told", LIMITS, float_range(10, 7 * 86400, "seconds")),
    Option("heartbeat_timeout", "seconds of silence after which a client counts as gone and its jobs are "
           "cancelled (clients send a heartbeat every 1 to 2 s)", LIMITS, float_range(3, 86400, "seconds")),
    Option("curve_secret_key", "the service's CURVE secret key file (krita-sdxl keys --name server)", SECURITY,
           metavar="FILE", shown=""),
    Option("authorized_keys", "folder with the public .key file of every client allowed in", SECURITY,
           metavar="DIR", shown=""),
    Option("admin_keys", "folder with the public .key file of every client allowed to unload models from "
           "another machine (clients on this machine always may)", SECURITY, metavar="DIR", shown=""),
    Option("insecure", "listen on a non-loopback address without authentication (not recommended)", SECURITY,
           shown=""),
    Option("identity", "", SERVICE, hidden=True),
    Option("pool", "none = one worker in this process; ray = a Ray Serve deployment of replicas, one per GPU, "
           "here or on every host of a Ray cluster", POOL, one_of("none", "ray"), choices=("none", "ray")),
    Option("replicas", "how many replicas (0 = one per GPU of the cluster, 1 without GPUs)", POOL,
           int_range(0, 1024), metavar="N"),
    Option("min_replicas", "autoscaling: fewest replicas (with --max-replicas)", POOL, int_range(0, 1024),
           metavar="N"),
    Option("max_replicas", "autoscaling: most replicas (0 = no autoscaling)", POOL, int_range(0, 1024),
           metavar="N"),
    Option("ray_address", "the Ray cluster to join: auto (the one started with `ray start` on this machine) or "
           "HOST:PORT of its head", POOL, metavar="ADDRESS", shown="start a local Ray"),
    Option("pool_name", "the pool's name on the Ray cluster (its Ray Serve application): one per service; "
           "letters, digits, '.', '_' and '-'", POOL, pool_name, metavar="NAME",
           shown="krita-sdxl-HOST-<hash of --endpoint>"),
    Option("replica_timeout", "seconds a job waits while no replica of the pool is running (all lost, or none "
           "could start) before it ends with model_error", POOL, float_range(1, 86400, "seconds"),
           metavar="SECONDS"),
    Option("tile_threshold", "tile images larger than this many pixels, or WxH (0 = never tile)", TILES,
           int_range(0, MAX_PIXELS), where="local", parse=pixel_count, metavar="PIXELS", shown="2048x2048"),
    Option("tile_size", "tile side in pixels", TILES, int_range(64, MAX_SIDE, multiple=8), where="local",
           metavar="PX"),
    Option("tile_overlap", "pixels neighbouring tiles share", TILES, int_range(0, MAX_SIDE), where="local",
           metavar="PX"),
    Option("upscaler", "an upscaler model file (.pth or .safetensors: ESRGAN, Real-ESRGAN, SwinIR, ...; needs pip "
           "install 'krita-sdxl[upscale]') that upscale jobs enlarge with before they refine", TILES, where="local",
           metavar="FILE", shown="Lanczos"),
)  # fmt: skip
CLIENT = "service"
CLIENT_OPTIONS: tuple[Option, ...] = (
    Option("endpoint", "the service's address: tcp://HOST:PORT, ipc://PATH or ipc", CLIENT, connect_endpoint,
           table="client", shown=f"[client] endpoint of the settings file, else its [serve] endpoint, else "
           f"{DEFAULT_ENDPOINT}"),
    Option("timeout", "seconds without any answer from the service (not even a heartbeat) before giving up",
           CLIENT, positive_seconds, table="client", parse=seconds),
    Option("server_key", "a CURVE service's public key, or its .key file", CLIENT, table="client",
           metavar="KEY|FILE", shown=""),
    Option("client_key", "this client's NAME.key_secret (from `krita-sdxl keys`; its public key authorized on the "
           "service)", CLIENT, table="client", metavar="FILE", shown=""),
)  # fmt: skip
BY_NAME = {o.name: o for o in OPTIONS}
BY_TABLE = {"serve": BY_NAME, "client": {o.name: o for o in CLIENT_OPTIONS}}
LOCAL_ONLY = tuple(o.name for o in OPTIONS if o.where == "local")  # refine: only with --local
_CLASSES: dict[str, Any] = {"serve": Settings, "client": ClientSettings}
_TYPES = {table: {f.name: type(f.default) for f in fields(cls)} for table, cls in _CLASSES.items()}
_DEFAULTS = {table: {f.name: f.default for f in fields(cls)} for table, cls in _CLASSES.items()}
_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string in quotes"}
AnySettings = TypeVar("AnySettings", Settings, ClientSettings)


def _help(option: Option, shown: str | None = None) -> str:
    if option.hidden:
        return argparse.SUPPRESS
    shown = shown if shown is not None else option.shown
    shown = shown if shown is not None else str(_DEFAULTS[option.table][option.name])
    return f"{option.help} (default: {shown})" if shown else option.help


def _add(target: Any, option: Option, shown: str | None = None) -> None:
    kind = _TYPES[option.table][option.name]
    kw: dict[str, Any] = {"dest": option.name, "default": None, "help": _help(option, shown)}
    if kind is bool:
        kw["action"] = "store_false" if option.off_flag else "store_true"
    else:
        kw["type"] = option.parse or kind
        kw.update(choices=option.choices, metavar=option.metavar)
    target.add_argument(option.flag, **kw)


def add_common(parser: argparse.ArgumentParser) -> None:
    for option in OPTIONS:
        if option.where == "common":
            _add(parser, option)


def add_settings(parser: argparse.ArgumentParser, command: str) -> None:
    """serve: every setting in its group; refine: the ones that apply to --local, in one group."""
    groups: dict[str, Any] = {}
    local = "running here (only with --local: the model loads in this process, no service)"
    for option in OPTIONS:
        if option.where == "common" or (command != "serve" and option.where != "local"):
            continue
        title = option.group if command == "serve" else local
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        _add(groups[title], option)
    if command == "serve":
        add_config_flag(groups[MODEL])


def add_config_flag(target: Any) -> None:
    target.add_argument(
        "--config",
        metavar="FILE",
        help="TOML settings file: a [serve] table for the service, a [client] table for refine and info (where "
        f"to connect); flags win over it (default: {default_config_path()} if it exists)",
    )


def add_client_flags(parser: argparse.ArgumentParser, timeout: float) -> None:
    """refine and info: where the service is, the keys, how long to wait (``timeout``: this command's default)."""
    group = parser.add_argument_group("service (flags win over the [client] table of the settings file)")
    for option in CLIENT_OPTIONS:
        _add(group, option, f"{timeout:g}" if option.name == "timeout" else None)
    add_config_flag(group)
    parser.set_defaults(default_timeout=timeout)


def given_local_flags(args: argparse.Namespace) -> list[str]:
    """The --local-only flags given on this refine command line."""
    return [BY_NAME[name].flag for name in LOCAL_ONLY if getattr(args, name, None) is not None]


def merge(base: AnySettings, values: dict[str, Any], source: str, toml: bool = False) -> AnySettings:
    """Apply ``values`` (None = not given), checking names, types and ranges; ConfigError names the culprit.
    ``base`` is a Settings ([serve]) or a ClientSettings ([client])."""
    table = "client" if isinstance(base, ClientSettings) else "serve"
    options, types = BY_TABLE[table], _TYPES[table]
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        name = key.replace("-", "_")
        option = options.get(name)
        where = f"{source}: {key} = {value!r}" if toml else f"{option.flag if option else key} {value}"
        if option is None or name not in types:
            known = sorted(options)
            hint = did_you_mean(name, known, "'{}'")
            raise ConfigError(f"{source}: unknown setting {key!r}{hint}; known: {', '.join(known)}")
        expected = types[name]
        if expected is float and type(value) is int:
            value = float(value)
        if expected is int and option.parse is pixel_count and type(value) is str:
            try:
                value = pixel_count(value)
            except argparse.ArgumentTypeError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if type(value) is not expected:
            raise ConfigError(f"{source}: {key} must be {_KINDS[expected]}, got {value!r}")
        if option.check is not None:
            try:
                value = option.check(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        clean[name] = value
    return replace(base, **clean)


def _config_file(args: argparse.Namespace) -> tuple[Path | None, dict[str, dict[str, Any]]]:
    """The settings file (--config, or the default one if it exists) and its tables, every value checked:
    a mistake anywhere in the file is refused by every command that reads it."""
    config = getattr(args, "config", None)
    path = Path(config).expanduser() if config else default_config_path()
    if not (config or path.is_file()):
        return None, {}
    tables = load_toml(path)
    merge(Settings(), tables["serve"], str(path), toml=True)
    merge(ClientSettings(), tables["client"], f"{path} [client]", toml=True)
    return path, tables


def resolve(args: argparse.Namespace) -> Settings:
    """Defaults, then the TOML file's [serve] table, then the flags given."""
    settings = Settings()
    path, tables = _config_file(args)
    if path is not None:
        settings = merge(settings, tables["serve"], str(path), toml=True)
    serve = getattr(args, "command", "serve") == "serve"  # refine's --endpoint is where to connect, not a setting
    flags = {o.name: getattr(args, o.name, None) for o in OPTIONS if serve or o.where != "serve"}
    return merge(settings, flags, "command line")


def reachable_endpoint(serve_endpoint: str, source: str) -> str:
    """The address a client on this machine connects to for a service that listens on ``serve_endpoint``:
    a wildcard host (``*``, ``0.0.0.0``, ``[::]``) is reached on loopback; port ``*`` cannot be known."""
    endpoint = parse_endpoint(serve_endpoint, bind=True)
    if endpoint.scheme != "tcp":
        return endpoint.text
    if endpoint.port == "*":
        raise ConfigError(
            f"{source}: [serve] endpoint {serve_endpoint!r} picks a free port, so a client cannot know it; set "
            "endpoint in a [client] table (or pass --endpoint)"
        )
    host = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(endpoint.host, None)
    return f"tcp://{host}:{endpoint.port}" if host else endpoint.text


@dataclass(frozen=True)
class ClientChoice:
    """The client settings of one command, and where each came from (for the messages)."""

    settings: ClientSettings
    origin: dict[str, str]  # setting name -> "--flag" or "FILE [client]" / "FILE [serve]"

    def named(self, name: str) -> str:
        """How a message names a setting: its flag, or its key in the file it came from."""
        flag = BY_TABLE["client"][name].flag
        source = self.origin.get(name, flag)
        return flag if source == flag else f"{name} in {source}"


def resolve_client(args: argparse.Namespace) -> ClientChoice:
    """refine and info: defaults, then the file's [serve] endpoint, then its [client] table (key files
    relative to the file's folder), then the flags given; no timeout anywhere: the command's default."""
    settings, origin = ClientSettings(), {}
    path, tables = _config_file(args)
    if path is not None:
        client, serve_endpoint = tables["client"], tables["serve"].get("endpoint")
        if "endpoint" not in client and serve_endpoint is not None:
            settings = replace(settings, endpoint=reachable_endpoint(serve_endpoint, str(path)))
            origin["endpoint"] = f"{path} [serve]"
        settings = merge(settings, client, f"{path} [client]", toml=True)
        origin.update({name: f"{path} [client]" for name in client})
        settings = replace(settings, **_beside(path.parent, settings, client))
    flags = {o.name: getattr(args, o.name, None) for o in CLIENT_OPTIONS}
    origin.update({name: BY_TABLE["client"][name].flag for name, value in flags.items() if value is not None})
    settings = merge(settings, flags, "command line")
    if not settings.timeout:
        settings = replace(settings, timeout=float(getattr(args, "default_timeout", 10.0)))
    return ClientChoice(settings, origin)


def _beside(folder: Path, settings: ClientSettings, given: dict[str, Any]) -> dict[str, str]:
    """The file's key file names, relative to the file's own folder (not to where the command runs)."""
    out = {}
    for name in ("server_key", "client_key"):
        value = getattr(settings, name)
        if name in given and value and not Path(value).expanduser().is_absolute():
            beside = folder / value
            if name == "client_key" or beside.is_file():  # a server key may be the key itself
                out[name] = str(beside)
    return out
