"""A validated job as the engine sees it: built once from a decoded ``submit`` message."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from krita_sdxl.protocol import Image, Message, StepPlan, plan_img2img


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

    @classmethod
    def from_message(cls, msg: Message, seed: int) -> RefineRequest:
        f = msg.fields
        work = None
        if f.get("work_width") is not None and f.get("work_height") is not None:
            work = (f["work_width"], f["work_height"])
        return cls(
            image=msg.images["image"],
            prompt=f["prompt"],
            negative_prompt=f["negative_prompt"],
            strength=f["strength"],
            plan=plan_img2img(f["steps"], f["strength"]),
            seed=seed,
            guidance_scale=f["guidance_scale"],
            aesthetic_score=f["aesthetic_score"],
            negative_aesthetic_score=f["negative_aesthetic_score"],
            preview=f["preview"],
            work_size=work,
            mask=msg.images.get("mask"),
            feather=f["feather"],
            transfer=f["transfer"],
        )
