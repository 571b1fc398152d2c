"""Memory modes: where the models' weights live between and during jobs.

- ``none``: everything on the device all the time (fastest).
- ``balanced``: the UNets stay on the GPU; the text encoders and the VAE live in CPU memory and move
  to the GPU only while they run (one at a time); the VAE is tiled for large images.
- ``model``: every model (text encoders, each UNet, VAE) moves to the GPU only while it runs, one
  at a time, as diffusers' ``enable_model_cpu_offload`` does (about half the GPU memory).
- ``sequential``: accelerate's per-layer offload (``enable_sequential_cpu_offload``): the least GPU
  memory and by far the slowest.
- ``auto``: chosen at start-up from the free GPU memory and the models' sizes, and reported.

The offload modes need a CUDA GPU. One placement serves the refiner and the base together, so a
module the two share (the VAE, text_encoder_2) is placed once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

MODES = ("none", "balanced", "model", "sequential")  # from the most GPU memory to the least
CHOICES = ("auto", *MODES)
NEEDS_GPU = ("balanced", "model", "sequential")
# Room for activations at about one megapixel: the real refiner peaks at 10.7 GiB with 6 GiB of weights.
WORK_MARGIN = 6 * 2**30
AUX = ("text_encoder", "text_encoder_2", "vae")  # what balanced moves on and off the GPU
VAE_TILE = 512  # px: VAE tile size in the offload modes (blended over a quarter of a tile)


class MemoryModeError(ValueError):
    """A memory mode this machine cannot run; the message says why and what to use instead."""


def check_mode(mode: str, device: str) -> None:
    if mode not in CHOICES:
        raise MemoryModeError(f"memory mode must be one of {', '.join(CHOICES)}; got {mode!r}")
    if mode in NEEDS_GPU and not device.startswith("cuda"):
        raise MemoryModeError(
            f"memory mode {mode!r} needs a GPU (CUDA); this machine runs on {device}. Use --memory none (or auto) here."
        )


def lower_mode(mode: str) -> str | None:
    """The next mode that needs less GPU memory, or None."""
    i = MODES.index(mode)
    return MODES[i + 1] if i + 1 < len(MODES) else None


@dataclass(frozen=True)
class Footprint:
    """Bytes of one model's weights on the device: its UNet, and everything else it brings."""

    unet: int
    other: int


def choose_auto(device: str, free: int | None, models: list[Footprint], margin: int = WORK_MARGIN) -> tuple[str, str]:
    """(mode, reason) for ``--memory auto``."""
    if not device.startswith("cuda") or free is None:
        return "none", f"no GPU offload on {device}"
    unets = sum(m.unet for m in models)
    total = unets + sum(m.other for m in models)
    biggest = max([m.unet for m in models] + [m.other for m in models] + [0])
    gib = 2**30

    def why(need: int) -> str:
        return f"{free / gib:.1f} GiB free on the GPU; this mode needs about {need / gib:.1f} GiB"

    if free >= total + margin:
        return "none", why(total + margin)
    balanced = unets + max([m.other for m in models] + [0]) + margin
    if free >= balanced:
        return "balanced", why(balanced)
    if free >= biggest + margin:
        return "model", why(biggest + margin)
    return "sequential", why(biggest + margin) + " even for one model at a time"


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class _SwapHook:
    """An accelerate hook: before its module runs, the placement puts it on the device (and takes
    the other movable modules off). Works for ``vae.encode``/``decode`` too (diffusers calls the hook)."""

    no_grad = False

    def __init__(self, placement: Placement, device: torch.device) -> None:
        self.placement = placement
        self.execution_device = device

    def init_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        from accelerate.utils import send_to_device

        self.placement.bring(module)
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return output

    def detach_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        return module


class Placement:
    """Places every loaded pipeline's modules for one memory mode."""

    def __init__(self, mode: str, device: str, requested: str | None = None, reason: str = "") -> None:
        check_mode(mode, device)
        if mode == "auto":
            raise MemoryModeError("resolve auto with choose_auto() before placing models")
        self.mode = mode
        self.device = device
        self.requested = requested or mode
        self.reason = reason
        self._modules: dict[int, torch.nn.Module] = {}  # every placed module
        self._movable: dict[int, torch.nn.Module] = {}  # modules that _SwapHook moves on and off
        self._on_device: set[int] = set()

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "requested": self.requested, "reason": self.reason}

    # --- placing ----------------------------------------------------------------------------------

    def install(self, pipe: Any) -> None:
        """Place a freshly loaded pipeline (on the CPU) for this mode."""
        for name, module in pipe.components.items():
            if not isinstance(module, torch.nn.Module) or id(module) in self._modules:
                continue
            self._modules[id(module)] = module
            module.requires_grad_(False)  # inference only (and offload hooks re-create parameters)
            self._place(name, module)
        if self.mode != "none":
            # Tiled VAE: in the offload modes the UNet's weights (4.2 GiB for the refiner) are still on
            # the GPU when the VAE decodes, and a whole 1024 px decode adds about 3 GiB of activations;
            # tiles of VAE_TILE px keep that under 1 GiB (diffusers' default tiles only above 1024 px).
            pipe.vae.enable_tiling()
            pipe.vae.tile_sample_min_size = VAE_TILE
            pipe.vae.tile_latent_min_size = VAE_TILE // 8

    def _place(self, name: str, module: torch.nn.Module) -> None:
        if self.mode == "none" or (self.mode == "balanced" and name not in AUX):
            module.to(self.device)
            return
        if self.mode == "sequential":
            from accelerate import cpu_offload

            cpu_offload(module, torch.device(self.device), offload_buffers=len(module._parameters) > 0)
            return
        from accelerate.hooks import add_hook_to_module

        module.to("cpu")
        self._movable[id(module)] = module
        hook: Any = _SwapHook(self, torch.device(self.device))  # duck-typed as accelerate.hooks.ModelHook
        add_hook_to_module(module, hook)

    def bring(self, module: torch.nn.Module) -> None:
        """Put ``module`` on the device, the other movable modules off it."""
        key = id(module)
        for other in [k for k in self._on_device if k != key]:
            self._movable[other].to("cpu")
            self._on_device.discard(other)
        if key not in self._on_device:
            module.to(self.device)
            self._on_device.add(key)

    def release(self) -> None:
        """Take the movable modules off the device (balanced: at every denoising step and after each
        VAE call, so only the UNets stay)."""
        if self.mode != "balanced":
            return
        self._offload_movable()

    def job_done(self) -> None:
        if self.mode in ("balanced", "model"):
            self._offload_movable()

    def _offload_movable(self) -> None:
        for key in list(self._on_device):
            self._movable[key].to("cpu")
        self._on_device.clear()

    # --- unloading and switching --------------------------------------------------------------------

    def forget(self, modules: list[torch.nn.Module]) -> None:
        """Stop placing ``modules`` (a model being unloaded): hooks off, weights to the CPU."""
        for module in modules:
            if self.mode == "sequential":  # its weights already live on the CPU; just let go
                key = id(module)
                self._modules.pop(key, None)
                continue
            self._detach(module)
            module.to("cpu")

    def _detach(self, module: torch.nn.Module) -> None:
        from accelerate.hooks import remove_hook_from_module

        key = id(module)
        if self.mode != "none":
            remove_hook_from_module(module, recurse=True)
        self._modules.pop(key, None)
        self._movable.pop(key, None)
        self._on_device.discard(key)

    def clear(self) -> None:
        """Stop placing anything: every hook off, every placed module back on the CPU."""
        for module in list(self._modules.values()):
            self._detach(module)
            module.to("cpu")

    def switch(self, mode: str, pipes: list[Any], reason: str = "") -> None:
        """Place every pipeline again for ``mode`` (the out-of-memory retry steps down with this)."""
        check_mode(mode, self.device)
        keep = {id(p.unet) for p in pipes} if mode == "balanced" else set()
        for module in list(self._modules.values()):
            self._detach(module)
            if id(module) not in keep:
                module.to("cpu")
        self.mode, self.reason = mode, reason
        from .oom import free_memory

        free_memory()
        for pipe in pipes:
            self.install(pipe)
        log.warning("memory mode is now %r (%s)", mode, reason)
