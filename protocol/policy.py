"""Strength and step policy for img2img: the one place that decides how many denoising steps run.

diffusers' img2img runs ``int(steps * strength)`` of ``steps`` scheduler steps and crashes when that
is zero. A slider value is not rejected for that: when ``steps * strength`` rounds down to zero,
``steps`` is raised to the smallest count that gives exactly one denoising step, and the adjusted
figures are reported back in the ``accepted`` event. The raised count never exceeds ``MAX_STEPS``
(the protocol's own limit on ``steps``): a strength so small that even ``MAX_STEPS`` steps give no
denoising step is refused with a ``bad_field`` error that names the smallest strength that works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BAD_FIELD, ProtocolError, shown

MAX_STEPS = 500  # scheduler steps: the most a submit may ask for, and the most the policy raises to


@dataclass(frozen=True)
class StepPlan:
    steps: int  # scheduler steps passed to the pipeline
    denoise_steps: int  # UNet steps that actually run
    adjusted: bool  # steps was raised to get at least one denoising step


def denoise_steps(steps: int, strength: float) -> int:
    """Exactly diffusers' ``min(int(num_inference_steps * strength), num_inference_steps)``."""
    return min(int(steps * strength), steps)


def _smallest_strength() -> float:
    """The smallest strength that gives one denoising step at ``MAX_STEPS`` scheduler steps."""
    strength = 1.0 / MAX_STEPS
    while denoise_steps(MAX_STEPS, strength) < 1:
        strength = math.nextafter(strength, 2.0)
    return strength


MIN_STRENGTH = _smallest_strength()


def plan_img2img(steps: int, strength: float) -> StepPlan:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n = denoise_steps(steps, strength)
    if n >= 1:
        return StepPlan(steps, n, False)
    if denoise_steps(MAX_STEPS, strength) < 1:  # int(steps * strength) only grows with steps
        raise ProtocolError(
            BAD_FIELD,
            f"strength {shown(strength)} is too small: even {MAX_STEPS} scheduler steps (the most a job may use) "
            f"give no denoising step; the smallest strength that works is {MIN_STRENGTH:g}",
            "strength",
        )
    raised = max(steps, min(int(1.0 / strength), MAX_STEPS))
    while denoise_steps(raised, strength) < 1:
        raised += 1
    return StepPlan(raised, denoise_steps(raised, strength), True)


def capped_steps(steps: int, strength: float, max_calls: int) -> int:
    """Scheduler steps for a job that may run at most ``max_calls`` denoising steps (UNet calls) at
    ``strength`` (live refine: ``steps`` as the artist set them, capped). Below the cap ``steps`` stays;
    above it, the smallest step count that gives exactly ``max_calls`` denoising steps, so the schedule
    still starts at the noise level ``strength`` asks for (``int(n * strength)`` grows by at most one
    per step, so the smallest ``n`` reaching the cap lands on it). Pure: the job that results is an
    ordinary ``submit`` with these steps, and gives the same pixels whoever sends it."""
    if max_calls < 1:
        raise ValueError(f"max_calls must be at least 1, got {max_calls}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if denoise_steps(steps, strength) <= max_calls:
        return steps
    n = max(1, math.ceil(max_calls / strength) - 1)  # a step or two below the answer: float rounding
    while denoise_steps(n, strength) < max_calls:
        n += 1
    return n


def paints_from_noise(mode: str, strength: float) -> bool:
    """The job's picture starts from pure noise, so the source gives only its size (and, with a
    selection, what is kept outside it): ``generate`` at strength 1 and ``two_stage``. Such a job
    may paint into an empty layer; its result's alpha is the selection's, not the source's."""
    return mode == "two_stage" or (mode == "generate" and strength >= 1.0)
