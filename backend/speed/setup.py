"""Setting up the speed level for a loaded refiner: choose the level this machine can run
(backend/speed/levels.py), log one line when it steps down, and apply it (backend/speed/speed_path.py's SpeedPath,
plus TensorRT engines for the ``trt`` level)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .levels import Plan, choose, probe
from .speed_path import SpeedOptions, SpeedPath, resolve_speed

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLImg2ImgPipeline

log = logging.getLogger(__name__)


def plan_options(plan: Plan, options: SpeedOptions) -> SpeedOptions:
    """The compile options a level runs with."""
    if not plan.compile:  # draft without compilation: the step cache alone
        return replace(options, unet_mode=None, vae_mode=None)
    if plan.unet == "trt":  # static engines per size bucket; the VAE compiled as usual
        return replace(options, unet_mode=None, buckets=True)
    return options


def setup(
    pipe: StableDiffusionXLImg2ImgPipeline,
    device: str,
    setting: str = "auto",
    cache_folder: Path | None = None,
    options: SpeedOptions | None = None,
    source: Any = None,
    offloaded: bool = False,
    plan: Plan | None = None,
) -> SpeedPath | None:
    """The speed path applied to ``pipe``, or None when ``setting`` comes down to off on this machine.
    ``source``: the refiner's ModelSource (the ``trt`` level builds its engines from its files)."""
    if not resolve_speed(setting, device):
        return None
    plan = plan or choose(setting, probe(device, setting, offloaded))
    if plan.summary():
        log.warning("%s", plan.summary())
    if not plan.enabled:
        return None
    options = options or SpeedOptions.from_env(device)
    if plan.unet == "trt" and source is None:
        plan = replace(plan, level="compile", unet="torch", buckets=False,
                       reasons=(*plan.reasons, "trt needs the model's files"))  # fmt: skip
        log.warning("%s", plan.summary())
    path = SpeedPath(pipe, device, plan_options(plan, options), cache_folder, plan=plan)
    path.apply()
    if plan.unet == "trt" and path.fallback is None:
        attach_trt(path, source)
    return path


def attach_trt(path: SpeedPath, source: Any) -> None:
    """TensorRT engines for the refiner UNet (built in the background); if that cannot even start, the
    UNet is compiled instead: the level runs as ``compile`` (one log line)."""
    from krita_sdxl.backend.speed.trt.unet import attach

    folder = (path.cache_folder or Path(".")) / "tensorrt"
    try:
        path.trt = attach(path.pipe, source, path.device, folder)
    except Exception as exc:
        why = f"TensorRT could not start: {type(exc).__name__}: {exc}"[:500]
        assert path.plan is not None
        path.plan = replace(path.plan, level="compile", unet="torch", reasons=(*path.plan.reasons, why))
        log.warning("%s", path.plan.summary())
        path.options = replace(path.options, unet_mode="default", buckets=False)
        path._compile_pipe(path.pipe, "", vae=False)


__all__ = ["attach_trt", "plan_options", "setup"]
