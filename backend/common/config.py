"""Service settings (defaults), where they live on disk, and the errors every command reports.

The option table in ``options.py`` fills :class:`Settings` from an optional TOML file and then the
command line (flags win), checking every value with the option's own validator.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # pyright: ignore[reportMissingImports]  (a dependency on Python 3.10 only)

from krita_sdxl.protocol.endpoint import DEFAULT_ENDPOINT

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-refiner-1.0"

# Exit statuses of every command (listed in `krita-sdxl --help`).
EXIT_OK = 0
EXIT_FAILED = 1  # the job failed, or the service could not be reached
EXIT_USAGE = 2  # a bad flag, setting, file or model: nothing was run
EXIT_JOB_LOST = 3  # the service restarted or dropped the job: safe to run the command again
EXIT_INTERRUPTED = 130  # Ctrl-C (a running job is cancelled on the service)


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "krita-sdxl" / "config.toml"


def default_cache_dir() -> Path:
    env = os.environ.get("KRITA_SDXL_CACHE")
    return Path(env) if env else Path(os.path.expanduser("~")) / ".cache" / "krita-sdxl"


@dataclass(frozen=True)
class Settings:
    """Types and defaults of every setting; help, flags and checks are in ``options.OPTIONS``."""

    endpoint: str = DEFAULT_ENDPOINT
    model: str = DEFAULT_MODEL  # Hugging Face repo id (local cache), a diffusers folder or a .safetensors file
    base_model: str = ""  # the same kinds; "" = the SDXL 1.0 base if it is in the local cache; "none" = no base
    model_config: str = ""  # single-file refiner: its diffusers config folder ("" = the shipped SDXL 1.0 one)
    base_model_config: str = ""  # single-file base: likewise
    memory: str = "auto"  # none, balanced, model, sequential, auto (backend/models/memory.py)
    oom_retry: bool = False  # out of memory: run the job once more in the next lower memory mode
    watermark: bool = True  # the invisible SDXL watermark, when invisible-watermark is installed
    simulate_oom: int = 0  # tests only: the first N UNet calls raise an out-of-memory error
    demo: bool = False  # the tiny random-weight demo model, built locally
    allow_download: bool = False
    device: str = "auto"  # auto, cuda, cuda:N, mps, cpu
    dtype: str = "auto"  # auto, fp16, bf16, fp32
    cache_dir: str = ""  # "" = $KRITA_SDXL_CACHE or ~/.cache/krita-sdxl
    log_level: str = "info"
    max_queue: int = 1000  # jobs queued or running, all clients together
    max_jobs_per_client: int = 32
    max_pixels: int = 8192 * 8192  # per image
    max_prompt_chars: int = 4000  # the protocol's limit (protocol/schema.py MAX_PROMPT_CHARS); a service may lower it
    max_connections: int = 1000  # open connections; also capped by the open files limit
    result_ttl: float = 600.0  # seconds an unread result is kept before it is dropped (with an error to its owner)
    heartbeat_timeout: float = 10.0  # seconds without a message before a client counts as gone
    curve_secret_key: str = ""  # the service's CURVE secret key file (from `krita-sdxl keys`)
    authorized_keys: str = ""  # folder of client public .key files allowed to connect
    admin_keys: str = ""  # folder of client public .key files allowed to unload models from another machine
    insecure: bool = False  # allow a non-loopback endpoint without CURVE
    identity: bool = False  # benchmark only: no model, results are the input pixels
    pool: str = "none"  # none: one worker in this process; ray: a Ray Serve pool of replicas (backend/pool)
    replicas: int = 0  # pool: fixed number of replicas; 0 = one per GPU of the Ray cluster (1 without GPUs)
    min_replicas: int = 0  # pool autoscaling: fewest replicas (with max_replicas)
    max_replicas: int = 0  # pool autoscaling: most replicas; 0 = a fixed number (replicas)
    ray_address: str = ""  # pool: "" = start a local Ray here; auto or HOST:PORT = join a running cluster
    pool_name: str = ""  # pool: the Ray Serve application's name; "" = one per service (host and endpoint)
    replica_timeout: float = 180.0  # pool: seconds a job waits while no replica runs, then model_error
    speed: str = "off"  # speed level (backend/speed/levels.py): off, compile, trt, fp8, draft; auto, on
    warmup: bool = True  # serve: compile the speed path at start-up, before the first job
    compile_cache: str = ""  # torch.compile caches; "" = <cache_dir>/torch-compile
    tile_threshold: int = (
        2048 * 2048
    )  # pixels; larger images are refined in tiles (backend/engine/tiling.py); 0 = never
    tile_size: int = 1024  # tile side in pixels, a multiple of 8
    tile_overlap: int = 128  # pixels shared by neighbouring tiles, blended
    upscaler: str = ""  # an upscaler model file (.pth, .safetensors) for upscale jobs; "" = Lanczos only

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


@dataclass(frozen=True)
class ClientSettings:
    """How the client commands (refine, info) reach a service: flags, else ``[client]``, else ``[serve]``'s
    endpoint (one file configures both on one machine); help, flags and checks are in ``options.CLIENT_OPTIONS``."""

    endpoint: str = DEFAULT_ENDPOINT
    server_key: str = ""  # a CURVE service's public key, or its .key file ("" = no CURVE)
    client_key: str = ""  # this client's NAME.key_secret file
    timeout: float = 0.0  # seconds of silence before giving up; 0 = the command's own default


TABLES = ("serve", "client")  # the tables a settings file may hold


class ConfigError(ValueError):
    """A bad flag, setting, file or model, found before any work: one line, exit status 2."""


class CommandFailed(RuntimeError):
    """The work failed (the message says why): one line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def did_you_mean(word: str, known: list[str] | tuple[str, ...], shown: str = "{}") -> str:
    """`` (did you mean X?)`` for a near miss of one of ``known``, else ""."""
    import difflib

    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean {shown.format(close[0])}?)" if close else ""


def load_toml(path: Path) -> dict[str, dict[str, Any]]:
    """The tables of a TOML settings file (``[serve]``, ``[client]``); anything else is refused in one line."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; give the .toml file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read (permission denied)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = ", ".join(f"[{t}]" for t in sorted(TABLES))
    for name, value in data.items():
        if name in TABLES and not isinstance(value, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {name} = {value!r} is outside any table; put it under one of {known}")
        if name not in TABLES:
            hint = did_you_mean(name, TABLES, "[{}]")
            raise ConfigError(f"{path}: unknown table [{name}]{hint}; known: {known}")
    return {name: data.get(name, {}) for name in TABLES}
