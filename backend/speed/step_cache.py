"""The ``draft`` speed level's step cache: DeepCache-style reuse of the UNet's deep features between
denoising steps (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", 2023).

Neighbouring denoising steps change the UNet's deep, low-resolution features little. Every
``interval``-th step of a denoising loop runs the whole UNet and keeps the outputs of its deep blocks
(the down blocks below ``branch``, the mid block and the up blocks above it); the steps in between run
only the shallow blocks (``conv_in``, ``down_blocks[:branch + 1]``, ``up_blocks[-branch - 1:]``,
``conv_out``) and take the deep features from that cache. In the SDXL refiner at 1024 px with
``branch`` 0 a cached step runs the 384-channel blocks only, about a tenth of a full step; with
``interval`` 3 a 15-step refine runs 5 full steps and 10 cached ones. The picture changes (the level is
lossy and opt-in); bench_speed_levels.py measures by how much.

A new denoising loop (a new job, stage or tile) is recognised without reading the timestep back from the
GPU: diffusers' pipelines iterate over their ``timesteps`` tensor, so the timesteps of one loop are
consecutive elements of one storage; anything else starts a new loop with a full step.

Installed by wrapping the deep blocks' and the UNet's ``forward`` (instance attributes): the regional
compile (which compiles the blocks' inner ResNet and transformer blocks) is untouched. Not for the
``whole`` scope, where the UNet is traced as one graph.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


class StepCache:
    def __init__(self, unet: Any, interval: int = 3, branch: int = 0) -> None:  # a UNet2DConditionModel
        downs, ups = list(unet.down_blocks), list(unet.up_blocks)
        if interval < 1:
            raise ValueError(f"step cache interval must be at least 1, got {interval}")
        if not 0 <= branch < len(downs) - 1 or len(ups) != len(downs):
            raise ValueError(f"step cache branch must be from 0 to {len(downs) - 2}, got {branch}")
        self.unet = unet
        self.interval = interval
        self.branch = branch
        mid = [unet.mid_block] if unet.mid_block is not None else []
        self.deep: list[torch.nn.Module] = downs[branch + 1 :] + mid + ups[: len(ups) - 1 - branch]
        self.reuse = False  # this UNet call takes the deep blocks' outputs from the cache
        self.counts = {"full": 0, "cached": 0}
        self._cache: dict[int, Any] = {}
        self._step = 0
        self._last: tuple[Any, ...] | None = None  # (shape, storage, offset) or (shape, value) of the last call
        self._saved: dict[int, Any] = {}

    def install(self) -> StepCache:
        if getattr(self.unet, "_step_cache", None) is not None:
            return self.unet._step_cache  # type: ignore[no-any-return]
        for module in [self.unet, *self.deep]:
            self._saved[id(module)] = module.__dict__.get("forward")
        self.unet.forward = self._unet_forward(self.unet.forward)  # type: ignore[method-assign]
        for block in self.deep:
            block.forward = self._block_forward(block, block.forward)  # type: ignore[method-assign]
        self.unet._step_cache = self  # type: ignore[assignment]
        return self

    def uninstall(self) -> None:
        for module in [self.unet, *self.deep]:
            saved = self._saved.get(id(module))
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved  # type: ignore[method-assign]
        self.unet.__dict__.pop("_step_cache", None)
        self._cache.clear()

    def describe(self) -> dict[str, Any]:
        return {"interval": self.interval, "branch": self.branch, "deep_blocks": len(self.deep), **self.counts}

    # --- per call --------------------------------------------------------------------------------

    def _position(self, sample: torch.Tensor, timestep: Any) -> tuple[Any, ...]:
        shape = tuple(sample.shape)
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 0:
            return (shape, timestep.untyped_storage().data_ptr(), timestep.storage_offset())
        return (shape, float(timestep) if not isinstance(timestep, torch.Tensor) else None)

    def _continues(self, now: tuple[Any, ...]) -> bool:
        last = self._last
        if last is None or last[0] != now[0] or len(last) != len(now):
            return False
        if len(now) == 3:
            return now[1] == last[1] and now[2] == last[2] + 1
        return now[1] is not None and last[1] is not None and now[1] < last[1]  # timesteps fall within a loop

    def decide(self, sample: torch.Tensor, timestep: Any) -> bool:
        """Whether this call reuses the cache (and advance the step count)."""
        now = self._position(sample, timestep)
        self._step = self._step + 1 if self._continues(now) else 0
        self._last = now
        self.reuse = self._step % self.interval != 0 and len(self._cache) == len(self.deep)
        self.counts["cached" if self.reuse else "full"] += 1
        if not self.reuse and self._step == 0:
            self._cache.clear()
        return self.reuse

    def _unet_forward(self, forward: Any) -> Any:
        def run(sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
            self.decide(sample, timestep)
            try:
                return forward(sample, timestep, *args, **kwargs)
            finally:
                self.reuse = False

        return run

    def _block_forward(self, block: torch.nn.Module, forward: Any) -> Any:
        key = id(block)

        def run(*args: Any, **kwargs: Any) -> Any:
            if self.reuse:
                return self._cache[key]
            out = forward(*args, **kwargs)
            self._cache[key] = out
            return out

        return run


def install(unet: torch.nn.Module, interval: int = 3, branch: int = 0) -> StepCache:
    return StepCache(unet, interval, branch).install()


__all__ = ["StepCache", "install"]
