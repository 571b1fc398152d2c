"""How a job's denoising is split between the base and the refiner: the one place that counts steps.

Modes (``submit.mode``):

- ``refine``: the refiner runs img2img on the source at ``strength`` (the step policy of
  :func:`krita_sdxl.protocol.plan_img2img`).
- ``generate`` (ensemble of experts): the base denoises the high-noise part of the schedule, down to
  ``denoising_end`` (0.8 = the first 80 % of the timesteps), and hands its latents to the refiner,
  which finishes from there. ``strength`` 1 starts from pure noise (the source gives only the size,
  the format, the alpha and, with a mask, the kept surroundings); below 1 the base runs img2img on
  the source first. When the whole re-run part of the schedule lies below the split, only the
  refiner runs (exactly a ``refine``).
- ``two_stage`` (SDEdit, as on the refiner's model card): the base generates from noise with all
  ``steps``, then the refiner runs img2img on the base's result at ``strength``.

Step counts follow diffusers' own arithmetic on the scheduler's timesteps, so the ``total`` in
``progress`` events is exactly the number of UNet calls that run. Scheduler steps never exceed
``MAX_STEPS`` (the protocol's limit): a ``strength`` or ``denoising_end`` that would need more is
refused with a ``bad_field`` error naming the smallest value that works.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from krita_sdxl.protocol import StepPlan, plan_img2img
from krita_sdxl.protocol.errors import BAD_FIELD, ProtocolError, shown
from krita_sdxl.protocol.policy import MAX_STEPS

MODES = ("refine", "generate", "two_stage")
BASE_MODES = ("generate", "two_stage")  # the modes that need the base model

# scheduler steps -> the scheduler's full timestep list for that many steps (descending)
TimestepsFn = Callable[[int], Sequence[int]]


@dataclass(frozen=True)
class Stages:
    """What runs, in order: the base (``base_steps`` UNet calls, 0 = not at all), then the refiner."""

    mode: str
    steps: int  # scheduler steps both models are set up with
    base_steps: int
    refiner_steps: int
    base_from_source: bool = False  # the base runs img2img on the source (generate, strength < 1)
    split: float | None = None  # generate: the fraction of the schedule the base covers (None: base not split)
    refiner_strength: float = 1.0  # refine and two_stage: the refiner's img2img strength

    @property
    def total(self) -> int:
        return self.base_steps + self.refiner_steps

    @property
    def from_source(self) -> bool:
        """The first model runs img2img on the source latents (refine; generate below strength 1).
        Stock diffusers then *samples* the source's VAE latent with the job's generator before it
        draws the noise; from noise (generate at strength 1, two_stage) it encodes nothing."""
        return self.base_from_source or not self.base_steps


def scheduler_timesteps(config: dict[str, Any] | None = None) -> TimestepsFn:
    """The timesteps function of a scheduler config (default: the SDXL 1.0 Euler scheduler)."""
    from diffusers import EulerDiscreteScheduler

    from krita_sdxl.backend.models.demo import SCHEDULER_CONFIG

    @functools.lru_cache(maxsize=2 * MAX_STEPS)
    def cached(steps: int) -> tuple[int, ...]:
        if config is None:
            scheduler: Any = EulerDiscreteScheduler(**SCHEDULER_CONFIG)  # any diffusers scheduler
        else:
            import diffusers

            cls = getattr(diffusers, str(config.get("_class_name", "EulerDiscreteScheduler")))
            scheduler = cls.from_config(config)
        scheduler.set_timesteps(steps)
        return tuple(int(t) for t in scheduler.timesteps)

    def timesteps(steps: int) -> list[int]:
        return list(cached(steps))

    return timesteps


def _cutoff(split: float, train_steps: int = 1000) -> int:
    """diffusers' ``discrete_timestep_cutoff`` for denoising_end / denoising_start."""
    return round(train_steps - split * train_steps)


def _refine(mode: str, steps: int, strength: float) -> tuple[StepPlan, Stages]:
    plan = plan_img2img(steps, strength)
    return plan, Stages(mode, plan.steps, 0, plan.denoise_steps, refiner_strength=strength)


def _generate(steps: int, strength: float, split: float, timesteps: TimestepsFn) -> tuple[StepPlan, Stages]:
    cut = _cutoff(split)
    if strength >= 1.0:  # from noise; raise steps (up to MAX_STEPS) until the base gets at least one
        n, last = steps, max(steps, MAX_STEPS)
        while True:
            ts = timesteps(n)
            base = sum(1 for t in ts if t >= cut)
            if base >= 1:
                break
            if n >= last:
                raise _split_too_small(split, steps, last, timesteps)
            n += 1
        refiner = len(ts) - base
        plan = StepPlan(n, base + refiner, n != steps)
        return plan, Stages("generate", n, base, refiner, split=split if split < 1.0 else None)
    img = plan_img2img(steps, strength)
    ts = timesteps(img.steps)
    rerun = ts[img.steps - img.denoise_steps :]
    base = sum(1 for t in rerun if t >= cut)
    if base == 0:  # all of the re-run part is the refiner's: a plain refine
        plan, stages = _refine("generate", steps, strength)
        return plan, stages
    refiner = sum(1 for t in ts if t < cut)
    stages = Stages("generate", img.steps, base, refiner, True, split if split < 1.0 else None, strength)
    return StepPlan(img.steps, base + refiner, img.adjusted), stages


def _split_too_small(split: float, steps: int, last: int, timesteps: TimestepsFn) -> ProtocolError:
    """The base gets no step at any count up to ``last``: name the smallest split that gives it one."""
    first = max(timesteps(n)[0] for n in range(steps, last + 1))
    smallest = (1000 - first) / 1000
    while _cutoff(smallest) > first:
        smallest += 1e-4
    return ProtocolError(
        BAD_FIELD,
        f"denoising_end {shown(split)} is too small: the base model gets no step of the schedule even at "
        f"{last} scheduler steps (the most a job may use); use denoising_end {smallest:.4g} or more",
        "denoising_end",
    )


def _two_stage(steps: int, strength: float) -> tuple[StepPlan, Stages]:
    refine = plan_img2img(steps, strength)
    # both run with the same scheduler steps (raised for both when the step policy raises them)
    stages = Stages("two_stage", refine.steps, refine.steps, refine.denoise_steps, refiner_strength=strength)
    return StepPlan(refine.steps, stages.total, refine.adjusted), stages


def plan_job(
    mode: str, steps: int, strength: float, split: float = 0.8, timesteps: TimestepsFn | None = None
) -> tuple[StepPlan, Stages]:
    """The step plan (as reported in ``accepted``: ``denoise_steps`` = every UNet call of the job)
    and the stages of one job. ``split`` is ``denoising_end``; ``timesteps`` the scheduler's."""
    if mode == "refine":
        return _refine(mode, steps, strength)
    if not 0.0 < split <= 1.0:
        raise ValueError(f"denoising_end must be in (0, 1], got {split}")
    if mode == "generate":
        return _generate(steps, strength, split, timesteps or scheduler_timesteps())
    if mode == "two_stage":
        return _two_stage(steps, strength)
    raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
