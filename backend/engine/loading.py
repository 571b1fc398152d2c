"""Loading the engine for ``serve`` and ``refine --local``: quietly, with every failure as one line.

Below ``--log-level debug`` the libraries' warnings (transformers, diffusers, torch), their loading
bars and the CLIP truncation warning are hidden; at debug they all show, warnings through logging.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from krita_sdxl.backend.common.config import ConfigError, Settings
from krita_sdxl.backend.common.logtext import EscapingFilter

log = logging.getLogger("krita_sdxl")
LIBRARIES = ("transformers", "diffusers", "huggingface_hub", "accelerate", "torch", "PIL", "urllib3", "filelock")


def configure_logging(level: str) -> None:
    """Our own messages at ``level``; the libraries' only at debug (else errors only)."""
    debug = level == "debug"
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger().setLevel(logging.DEBUG if debug else logging.WARNING)
    for handler in logging.getLogger().handlers:  # a client's text never forges a log line
        if not any(isinstance(f, EscapingFilter) for f in handler.filters):
            handler.addFilter(EscapingFilter())
    for name in ("krita_sdxl", "backend", "krita_sdxl_refiner"):
        logging.getLogger(name).setLevel(level.upper())
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)
    if debug:
        logging.captureWarnings(True)
        return
    warnings.simplefilter("ignore")
    for var, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ):
        os.environ.setdefault(var, value)


def quiet_libraries(level: str) -> None:
    """After the libraries are imported: their own verbosity and loading bars."""
    if level == "debug":
        return
    for module in ("diffusers", "transformers"):
        try:
            lib = __import__(f"{module}.utils.logging", fromlist=["logging"])
        except ImportError:
            continue
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def tiling(settings: Settings) -> Any:
    """The engine's tiling settings (backend/engine/tiling.py); ConfigError when they do not fit together."""
    from .tiling import TilingConfig

    try:
        return TilingConfig(threshold=settings.tile_threshold, tile=settings.tile_size, overlap=settings.tile_overlap)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def upscaler(settings: Settings, device: str = "cpu") -> Any:
    """The ``--upscaler`` model (None without one) on ``device``; ConfigError names the file and the problem."""
    if not settings.upscaler:
        return None
    from .upscaler_model import UpscalerError, load_upscaler

    try:
        model = load_upscaler(settings.upscaler)
    except UpscalerError as exc:
        raise ConfigError(f"--upscaler: {exc}") from None
    return model.to(device, half=settings.dtype != "fp32")


def load_engine(settings: Settings) -> Any:
    """The engine with the settings' model; ConfigError with one line when it cannot be loaded."""
    from krita_sdxl.backend.models.memory import MemoryModeError
    from krita_sdxl.backend.models.refiner import ModelNotFound

    from .sdxl_engine import Engine

    quiet_libraries(settings.log_level)
    name = "the demo model" if settings.demo else settings.model
    try:
        engine = Engine.load(
            model=None if settings.demo else settings.model,
            demo=settings.demo,
            allow_download=settings.allow_download,
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.cache_path,
            speed=settings.speed,
            compile_cache=Path(settings.compile_cache).expanduser() if settings.compile_cache else None,
            base_model=settings.base_model or None,
            model_config=settings.model_config or None,
            base_model_config=settings.base_model_config or None,
            memory=settings.memory,
            watermark=settings.watermark,
            oom_retry=settings.oom_retry,
            simulate_oom=settings.simulate_oom,
        )
    except (ModelNotFound, MemoryModeError, ValueError) as exc:  # ValueError: device or dtype not available
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # a broken checkpoint or folder: struct.error, OSError, KeyError, ...
        log.debug("loading %s failed", name, exc_info=True)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"cannot load {name}: {type(exc).__name__}: {first} (is it a complete SDXL "
            f"{'checkpoint' if str(name).endswith('.safetensors') else 'model'}? --log-level debug shows details)"
        ) from None
    engine.upscaler = upscaler(settings, engine.device)  # upscale jobs (backend/engine/upscale.py)
    return engine
