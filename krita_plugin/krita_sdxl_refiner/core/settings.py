"""The artist's settings: typed values, read from and written to a string key/value store.

Inside Krita the store is Krita's own settings (``kritarc``, group ``krita_sdxl``), reached through
``Krita.instance().readSetting/writeSetting`` in ``adapters.krita_adapter``. Here: only parsing, defaults
and clamping, so a hand-edited or stale kritarc never breaks the plugin.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from krita_sdxl.backend.setup.plan.torch_builds import BUILDS
from krita_sdxl.protocol.endpoint import DEFAULT_ENDPOINT
from krita_sdxl.protocol.images import MAX_SIDE

from .upscale import FACTORS, METHODS, PLACES, SIZE, UPSCALE

GROUP = "krita_sdxl"

SOURCES = ("layer", "canvas")
MAX_FIXED_SEED = 2**64 - 1

# Reads one key; returns the default (a string) when the key is absent.
ReadFn = Callable[[str, str], str]
WriteFn = Callable[[str, str], None]


@dataclass(frozen=True)
class Settings:
    endpoint: str = DEFAULT_ENDPOINT
    mode: str = "refine"
    prompt: str = ""
    negative_prompt: str = ""
    strength: float = 0.3
    steps: int = 30
    guidance: float = 5.0
    seed: int = -1  # -1: a random seed for every job
    source: str = "layer"  # "layer": the active layer; "canvas": the visible image
    preview: bool = False
    feather_fraction: float = 0.1  # share of the selection's diagonal, scaled by strength
    padding_fraction: float = 0.06  # context around the selection: share of its diagonal
    denoising_end: float = 0.8  # generate: the share of the schedule the base runs before the refiner
    keep_unmasked: bool = True  # with a selection: the area outside it is held to the source while denoising
    backend_command: str = "krita-sdxl"  # the krita-sdxl command, or a Python that has it installed
    backend_args: str = "serve"
    server_public_key: str = ""  # CURVE, for a backend on another machine: the service's public key
    client_secret_key: str = ""  # CURVE: path of this client's NAME.key_secret file
    setup_folder: str = ""  # Set up: where the backend's environment and log go ("" = in Krita's app data)
    setup_base: bool = False  # Set up: also download the SDXL base
    setup_torch: str = "auto"  # Set up: the PyTorch build (auto = from the GPU found)
    upscale_factor: str = "2"  # Upscale: 1.5, 2, 3, 4, or "size" (fit in upscale_width x upscale_height)
    upscale_width: int = 4096
    upscale_height: int = 4096
    upscale_strength: float = 0.3  # Upscale: the refine's strength; 0 = the enlargement alone
    upscale_place: str = "new"  # Upscale: "new" document, or "scale" this document and add the result as a layer
    upscale_method: str = "auto"  # Upscale: auto, lanczos or model (the backend's upscaler file)
    upscaler_file: str = ""  # the local backend's upscaler model (serve --upscaler FILE); "" = none
    live_calls: int = 6  # Live: at most this many UNet calls a job (the steps are capped, the strength kept)
    live_side: int = 1024  # Live: the work size's long side at most (px); smaller areas run at their own size
    live_wait_ms: int = 250  # Live: a job starts once the canvas has been still this long

    @property
    def random_seed(self) -> bool:
        return self.seed < 0

    @property
    def strength_key(self) -> str:
        """The setting the Strength slider shows: an upscale has its own (0 allowed: the enlargement alone)."""
        return "upscale_strength" if self.mode == UPSCALE else "strength"

    def changed(self, **changes: Any) -> Settings:
        """A copy with some values replaced, each parsed and clamped as if read from the store."""
        merged = {**asdict(self), **changes}
        return from_strings(lambda key, default: _to_string(merged.get(key, default)))


_LIMITS: dict[str, tuple[float, float]] = {
    "strength": (0.01, 1.0),
    "steps": (1, 500),
    "guidance": (0.0, 50.0),
    "seed": (-1, MAX_FIXED_SEED),
    "feather_fraction": (0.0, 0.5),
    "padding_fraction": (0.0, 1.0),
    "denoising_end": (0.05, 1.0),
    "upscale_width": (8, MAX_SIDE),
    "upscale_height": (8, MAX_SIDE),
    "upscale_strength": (0.0, 1.0),
    "live_calls": (1, 20),
    "live_side": (256, 2048),
    "live_wait_ms": (0, 5000),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "source": SOURCES,
    "setup_torch": tuple(BUILDS),
    "upscale_factor": (*FACTORS, SIZE),
    "upscale_place": PLACES,
    "upscale_method": METHODS,
}


def _to_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(kind: type, text: str, default: Any) -> Any:
    text = text.strip() if kind is not str else text
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            return default
        if kind in (int, float):
            value = float(text)  # "30", "30.0" and "1e2" alike; "inf" and "nan" fall back
            if not math.isfinite(value):
                return default
            return int(value) if kind is int else value
        return text
    except ValueError:
        return default


def from_strings(read: ReadFn) -> Settings:
    """Settings from a string store; missing, malformed or out-of-range values fall back or clamp."""
    defaults = Settings()
    values: dict[str, Any] = {}
    for f in fields(Settings):
        default = getattr(defaults, f.name)
        kind = type(default)
        value = _parse(kind, read(f.name, _to_string(default)), default)
        if f.name in _LIMITS:
            lo, hi = _LIMITS[f.name]
            value = kind(min(max(value, lo), hi))
        values[f.name] = value
    for name, choices in CHOICES.items():
        if values[name] not in choices:
            values[name] = getattr(defaults, name)
    if not values["endpoint"].strip():
        values["endpoint"] = defaults.endpoint
    values["endpoint"] = values["endpoint"].strip()
    return replace(defaults, **values)


def to_strings(settings: Settings) -> dict[str, str]:
    return {key: _to_string(value) for key, value in asdict(settings).items()}


def load(read: ReadFn) -> Settings:
    return from_strings(read)


def save(settings: Settings, write: WriteFn, previous: Settings | None = None) -> None:
    """Write the values (only the changed ones when ``previous`` is given)."""
    old = to_strings(previous) if previous is not None else {}
    for key, value in to_strings(settings).items():
        if old.get(key) != value:
            write(key, value)
