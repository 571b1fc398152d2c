"""Strength and step policy for img2img: the one place that decides how many denoising steps run.

diffusers' img2img runs ``int(steps * strength)`` of ``steps`` scheduler steps and crashes when that
is zero. We never reject a slider value: when ``steps * strength`` rounds down to zero, ``steps`` is
raised to the smallest count that gives exactly one denoising step, and the adjusted figures are
reported back in the ``accepted`` event.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    steps: int  # scheduler steps passed to the pipeline
    denoise_steps: int  # UNet steps that actually run
    adjusted: bool  # steps was raised to get at least one denoising step


def denoise_steps(steps: int, strength: float) -> int:
    """Exactly diffusers' ``min(int(num_inference_steps * strength), num_inference_steps)``."""
    return min(int(steps * strength), steps)


def plan_img2img(steps: int, strength: float) -> StepPlan:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n = denoise_steps(steps, strength)
    if n >= 1:
        return StepPlan(steps, n, False)
    raised = max(steps, int(1.0 / strength))
    while denoise_steps(raised, strength) < 1:
        raised += 1
    return StepPlan(raised, denoise_steps(raised, strength), True)
