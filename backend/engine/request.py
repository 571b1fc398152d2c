"""A validated job as the engine sees it: built once from a decoded ``submit`` message."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from krita_sdxl.protocol import Image, ImageSpec, Message, StepPlan
from krita_sdxl.protocol.upscale import UpscaleSpec, plan_steps

if TYPE_CHECKING:
    from .stages import Stages, TimestepsFn


class JobCancelled(Exception):
    """Raised inside a running job when its client cancelled it (or the service is stopping)."""


# on_progress(step, total, preview_or_None): called after every denoising step.
ProgressFn = Callable[[int, int, "Image | None"], None]
# should_stop(): polled at every step boundary; True makes the engine raise JobCancelled.
StopFn = Callable[[], bool]


@dataclass(frozen=True)
class RefineRequest:
    image: Image
    prompt: str
    negative_prompt: str
    strength: float
    plan: StepPlan  # scheduler steps after the step policy, and the denoising steps that run
    seed: int
    guidance_scale: float
    aesthetic_score: float
    negative_aesthetic_score: float
    preview: bool = False
    work_size: tuple[int, int] | None = None  # (width, height) the model runs at; None = native
    mask: Image | None = None  # L image, same size as image: result alpha is multiplied by it
    feather: float = 0.0  # inward feather of the mask, in image pixels
    transfer: str = "srgb"  # "linear": pixels are linear light; encoded to sRGB for the model and back
    mode: str = "refine"  # refine, generate or two_stage (backend/engine/stages.py)
    stages: Stages | None = None  # how the denoising is split between base and refiner; None = refine
    keep_unmasked: bool = True  # with a mask: only the masked area is re-noised, the rest kept
    upscale: UpscaleSpec | None = None  # the result's size: enlarged, then refined in tiles (engine/upscale.py)

    @property
    def result_spec(self) -> ImageSpec:
        """The result's size and format: the image's, at an upscale's size for an upscale."""
        spec, up = self.image.spec, self.upscale
        return spec if up is None else ImageSpec(up.width, up.height, spec.order, spec.depth, spec.sample)

    @classmethod
    def from_message(cls, msg: Message, seed: int, timesteps: TimestepsFn | None = None) -> RefineRequest:
        """``timesteps``: the models' :class:`~.stages.Schedule` (the engine's ``timesteps``); None = SDXL 1.0's."""
        f = msg.fields
        work = None
        if f.get("work_width") is not None and f.get("work_height") is not None:
            work = (f["work_width"], f["work_height"])
        mode = f.get("mode", "refine")
        from .stages import plan_job  # the UNet calls each stage makes with the models' schedulers

        upscale = f.get("upscale")
        if upscale is not None and f["strength"] == 0.0:  # the enlargement alone (protocol/upscale.py)
            plan, stages = plan_steps(f["steps"], 0.0), None
        else:  # an upscale at strength > 0 runs the refine's steps in every tile
            plan, stages = plan_job(mode, f["steps"], f["strength"], f.get("denoising_end", 0.8), timesteps)
        return cls(
            image=msg.images["image"],
            prompt=f["prompt"],
            negative_prompt=f["negative_prompt"],
            strength=f["strength"],
            plan=plan,
            seed=seed,
            guidance_scale=f["guidance_scale"],
            aesthetic_score=f["aesthetic_score"],
            negative_aesthetic_score=f["negative_aesthetic_score"],
            preview=f["preview"],
            work_size=work,
            mask=msg.images.get("mask"),
            feather=f["feather"],
            transfer=f["transfer"],
            mode=mode,
            stages=stages,
            keep_unmasked=f.get("keep_unmasked", True),
            upscale=upscale,
        )
