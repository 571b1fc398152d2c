"""What a live job sends: the artist's settings with the live caps applied. Pure.

A live job is an ordinary refine job: the same capture and plan as the Refine button, the session's fixed
seed, the scheduler steps capped so that at most ``live_calls`` UNet calls run (``protocol.policy.
capped_steps``: the strength is kept), and the work size capped at ``live_side`` px on the long side (the
selection's own size below that: live never scales up). Anyone who sends the same fields without ``live``
gets the same pixels.
"""

from __future__ import annotations

from dataclasses import replace

from krita_sdxl.protocol.geometry import SNAP, Extent
from krita_sdxl.protocol.policy import capped_steps

from .jobs import JobParams
from .plan import RefinePlan
from .settings import Settings

LIVE_MODE = "refine"  # live refine runs the refiner alone, whatever the docker's mode


def live_work(area: Extent, max_side: int) -> Extent:
    """The work size of a live job: ``area``, scaled down to ``max_side`` on its long side when larger,
    each side rounded down to a multiple of 8 (the VAE's); never scaled up (at least 8 px a side)."""
    scale = min(1.0, max_side / max(1, area.longest_side))
    return Extent(max(SNAP, int(area.width * scale) // SNAP * SNAP), max(SNAP, int(area.height * scale) // SNAP * SNAP))


def live_plan(plan: RefinePlan, max_side: int) -> RefinePlan:
    """The Refine button's plan (crop, feather, mask) with the live work size."""
    return replace(plan, work=live_work(plan.crop.extent, max_side))


def live_params(s: Settings, seed: int) -> JobParams:
    """The job settings of a live job (no per-step previews: the preview layer is the preview)."""
    return JobParams(
        mode=LIVE_MODE,
        prompt=s.prompt,
        negative_prompt=s.negative_prompt,
        strength=s.strength,
        steps=capped_steps(s.steps, s.strength, s.live_calls),
        guidance=s.guidance,
        seed=seed,
        preview=False,
        keep_unmasked=s.keep_unmasked,
    )


def live_inputs(s: Settings) -> tuple[object, ...]:
    """The settings a live job depends on: when any of them changes, the preview is refreshed."""
    return (s.prompt, s.negative_prompt, s.strength, s.steps, s.guidance, s.keep_unmasked, s.feather_fraction,
            s.padding_fraction, s.live_calls, s.live_side)  # fmt: skip
