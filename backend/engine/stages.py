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

Step counts follow diffusers' own arithmetic on each model's scheduler (:class:`Schedule`: its timesteps and
its order), so the ``total`` in ``progress`` events is exactly the number of UNet calls that run, for any
scheduler: a second-order one (Heun, KDPM2) calls the UNet twice per step after the first (refine at 20
steps x 0.5: 19 calls), PNDM adds its warm-up steps. Scheduler steps never exceed
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
TRAIN_STEPS = 1000  # the SDXL schedulers' num_train_timesteps


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


class Schedule:
    """One scheduler's step arithmetic, exactly as diffusers' SDXL pipelines do it: its timesteps for a step
    count, its order, and the UNet calls of each kind of pipeline call. Callable as a :data:`TimestepsFn`.
    ``base``: the base model's schedule, when it has its own scheduler (else this one)."""

    def __init__(self, config: dict[str, Any] | None = None, base: Schedule | None = None) -> None:
        self.config = dict(config) if config is not None else None
        self._base = base

    @property
    def base(self) -> Schedule:
        return self._base or self

    @functools.lru_cache(maxsize=2 * MAX_STEPS)  # noqa: B019 (a schedule lives as long as its engine)
    def _set(self, steps: int) -> tuple[tuple[int, ...], int, int]:
        """(timesteps, order, num_train_timesteps) of the scheduler set up for ``steps``."""
        from diffusers import EulerDiscreteScheduler

        from krita_sdxl.backend.models.demo import SCHEDULER_CONFIG

        if self.config is None:
            scheduler: Any = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
        else:
            import diffusers

            cls = getattr(diffusers, str(self.config.get("_class_name", "EulerDiscreteScheduler")))
            scheduler = cls.from_config(self.config)
        scheduler.set_timesteps(steps)
        train = int(getattr(scheduler.config, "num_train_timesteps", TRAIN_STEPS))
        return tuple(int(t) for t in scheduler.timesteps), int(getattr(scheduler, "order", 1)), train

    def __call__(self, steps: int) -> list[int]:
        return list(self._set(steps)[0])

    def order(self, steps: int = 10) -> int:
        return self._set(steps)[1]

    def _cutoff(self, steps: int, split: float) -> int:
        return _cutoff(split, self._set(steps)[2])

    def text2img(self, steps: int, end: float | None = None) -> int:
        """UNet calls of a text-to-image call (the base from noise), up to ``denoising_end``."""
        timesteps = self._set(steps)[0]
        if end is None or not 0.0 < end < 1.0:
            return len(timesteps)
        cut = self._cutoff(steps, end)
        return sum(1 for t in timesteps if t >= cut)

    def img2img(self, steps: int, strength: float, end: float | None = None) -> int:
        """UNet calls of an img2img call at ``strength`` (``get_timesteps``), up to ``denoising_end``."""
        timesteps, order, _ = self._set(steps)
        start = max(steps - min(int(steps * strength), steps), 0)
        rerun = timesteps[start * order :]
        if end is None or not 0.0 < end < 1.0:
            return len(rerun)
        cut = self._cutoff(steps, end)
        return sum(1 for t in rerun if t >= cut)

    def takeover(self, steps: int, start: float) -> int:
        """UNet calls of the refiner taking over at ``denoising_start`` (a second-order scheduler's count is
        made odd, so that it ends after a whole step, as diffusers does)."""
        timesteps, order, _ = self._set(steps)
        cut = self._cutoff(steps, start)
        n = sum(1 for t in timesteps if t < cut)
        return n + 1 if order == 2 and n % 2 == 0 else n


def _cutoff(split: float, train_steps: int = TRAIN_STEPS) -> int:
    """diffusers' ``discrete_timestep_cutoff`` for denoising_end / denoising_start."""
    return round(train_steps - split * train_steps)


def scheduler_timesteps(config: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> Schedule:
    """The :class:`Schedule` of a scheduler config (default: the SDXL 1.0 Euler scheduler); ``base``: the
    base model's scheduler config, when it is known and differs."""
    return Schedule(config, Schedule(base) if base is not None and base != config else None)


def as_schedule(timesteps: TimestepsFn | None) -> Schedule:
    """A :class:`Schedule` for what callers pass: a Schedule, None (SDXL 1.0's), or a bare timesteps function
    (first-order arithmetic on its timesteps)."""
    if isinstance(timesteps, Schedule):
        return timesteps
    if timesteps is None:
        return Schedule()
    return _Timesteps(timesteps)


class _Timesteps(Schedule):
    """A bare timesteps function as a first-order schedule."""

    def __init__(self, fn: TimestepsFn) -> None:
        super().__init__()
        self._fn = fn

    def _set(self, steps: int) -> tuple[tuple[int, ...], int, int]:  # type: ignore[override]
        return tuple(int(t) for t in self._fn(steps)), 1, TRAIN_STEPS


def _refine(mode: str, steps: int, strength: float, schedule: Schedule) -> tuple[StepPlan, Stages]:
    plan = plan_img2img(steps, strength)
    calls = schedule.img2img(plan.steps, strength)
    return StepPlan(plan.steps, calls, plan.adjusted), Stages(mode, plan.steps, 0, calls, refiner_strength=strength)


def _generate(steps: int, strength: float, split: float, schedule: Schedule) -> tuple[StepPlan, Stages]:
    base_schedule, splits = schedule.base, split < 1.0
    if strength >= 1.0:  # from noise; raise steps (up to MAX_STEPS) until the base gets at least one
        n, last = steps, max(steps, MAX_STEPS)
        while True:
            base = base_schedule.text2img(n, split)
            if base >= 1:
                break
            if n >= last:
                raise _split_too_small(split, steps, last, base_schedule)
            n += 1
        refiner = schedule.takeover(n, split) if splits else 0
        plan = StepPlan(n, base + refiner, n != steps)
        return plan, Stages("generate", n, base, refiner, split=split if splits else None)
    img = plan_img2img(steps, strength)
    base = base_schedule.img2img(img.steps, strength, split)
    if base == 0:  # all of the re-run part is the refiner's: a plain refine
        return _refine("generate", steps, strength, schedule)
    refiner = schedule.takeover(img.steps, split) if splits else 0
    stages = Stages("generate", img.steps, base, refiner, True, split if splits else None, strength)
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


def _two_stage(steps: int, strength: float, schedule: Schedule) -> tuple[StepPlan, Stages]:
    refine = plan_img2img(steps, strength)
    # both run with the same scheduler steps (raised for both when the step policy raises them)
    base, refiner = schedule.base.text2img(refine.steps), schedule.img2img(refine.steps, strength)
    stages = Stages("two_stage", refine.steps, base, refiner, refiner_strength=strength)
    return StepPlan(refine.steps, stages.total, refine.adjusted), stages


def plan_job(
    mode: str, steps: int, strength: float, split: float = 0.8, timesteps: TimestepsFn | None = None
) -> tuple[StepPlan, Stages]:
    """The step plan (as reported in ``accepted``: ``denoise_steps`` = every UNet call of the job)
    and the stages of one job. ``split`` is ``denoising_end``; ``timesteps`` the models' :class:`Schedule`
    (None: SDXL 1.0's Euler scheduler)."""
    schedule = as_schedule(timesteps)
    if mode == "refine":
        return _refine(mode, steps, strength, schedule)
    if not 0.0 < split <= 1.0:
        raise ValueError(f"denoising_end must be in (0, 1], got {split}")
    if mode == "generate":
        return _generate(steps, strength, split, schedule)
    if mode == "two_stage":
        return _two_stage(steps, strength, schedule)
    raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
