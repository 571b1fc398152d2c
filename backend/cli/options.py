"""The one table of service settings: it builds the command-line flags (with help and the default
shown), reads the TOML file and fills :class:`Settings`, checking every value with the option's own
validator, whichever way it came in. Types and defaults come from :class:`Settings`."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from krita_sdxl.backend.common.config import ConfigError, Settings, default_config_path, load_toml
from krita_sdxl.backend.speed.levels import CHOICES as SPEED_CHOICES
from krita_sdxl.protocol.endpoint import EndpointError, parse_endpoint
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
    Option("heartbeat_timeout", "seconds of silence after which a client counts as gone and its jobs are "
           "cancelled (clients send a heartbeat every 1 to 2 s)", LIMITS, float_range(3, 86400, "seconds")),
    Option("curve_secret_key", "the service's CURVE secret key file (krita-sdxl keys --name server)", SECURITY,
           metavar="FILE", shown=""),
    Option("authorized_keys", "folder with the public .key file of every client allowed in", SECURITY,
           metavar="DIR", shown=""),
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
BY_NAME = {o.name: o for o in OPTIONS}
LOCAL_ONLY = (*(o.name for o in OPTIONS if o.where == "local"), "config")  # refine: only with --local
_TYPES = {f.name: type(f.default) for f in fields(Settings)}
_DEFAULTS = {f.name: f.default for f in fields(Settings)}
_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string in quotes"}


def _help(option: Option) -> str:
    if option.hidden:
        return argparse.SUPPRESS
    shown = option.shown if option.shown is not None else str(_DEFAULTS[option.name])
    return f"{option.help} (default: {shown})" if shown else option.help


def _add(target: Any, option: Option) -> None:
    kind = _TYPES[option.name]
    kw: dict[str, Any] = {"dest": option.name, "default": None, "help": _help(option)}
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
    groups[MODEL if command == "serve" else local].add_argument(
        "--config",
        metavar="FILE",
        help="TOML settings file with a [serve] table; flags win over it (default: "
        f"{default_config_path()} if it exists)",
    )


def given_local_flags(args: argparse.Namespace) -> list[str]:
    """The --local-only flags given on this refine command line."""
    flags = {**{o.name: o.flag for o in OPTIONS}, "config": "--config"}
    return [flags[name] for name in LOCAL_ONLY if getattr(args, name, None) is not None]


def merge(base: Settings, values: dict[str, Any], source: str, toml: bool = False) -> Settings:
    """Apply ``values`` (None = not given), checking names, types and ranges; ConfigError names the culprit."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        name = key.replace("-", "_")
        option = BY_NAME.get(name)
        where = f"{source}: {key} = {value!r}" if toml else f"{option.flag if option else key} {value}"
        if option is None or name not in _TYPES:
            known = ", ".join(sorted(BY_NAME))
            raise ConfigError(f"{source}: unknown setting {key!r}; known: {known}")
        expected = _TYPES[name]
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


def resolve(args: argparse.Namespace) -> Settings:
    """Defaults, then the TOML file (--config, or the default one if it exists), then the flags given."""
    settings = Settings()
    config = getattr(args, "config", None)
    path = Path(config).expanduser() if config else default_config_path()
    if config or path.is_file():
        settings = merge(settings, load_toml(path), str(path), toml=True)
    serve = getattr(args, "command", "serve") == "serve"  # refine's --endpoint is where to connect, not a setting
    flags = {o.name: getattr(args, o.name, None) for o in OPTIONS if serve or o.where != "serve"}
    return merge(settings, flags, "command line")
