"""Running a job's denoising stages (:mod:`.stages`) on latents: base, refiner, or both in turn.

Every pipeline is called with ``output_type="latent"``; the engine runs the VAE itself. One
:class:`StepReporter` spans all stages, so progress counts base and refiner steps in one total, and
holds the unmasked latents to the source after every step when the job has a mask.

One ``torch.Generator`` (CPU, seeded with the job's seed) serves the whole job, in stock diffusers'
order: the engine samples the source's VAE latent from it first when the first model runs img2img
on the source (as stock img2img does), then every pipeline draws its noise from it in turn. A masked
job holds its unmasked area with the very noise its stage's pipeline draws: :func:`initial_noise`
reads it from a copy of the generator's state just before the pipeline is called. A masked stage that
runs on the source picture draws once more after its noise, as stock's inpaint pipeline does when it
encodes the masked picture (:func:`inpaint_draw`): ancestral schedulers (Euler Ancestral, KDPM2
Ancestral, DDPM), which draw at every step, then give stock's picture for the same seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .latent_mask import LatentMask
from .preview import latents_to_preview
from .request import JobCancelled, ProgressFn, RefineRequest, StopFn
from .stages import Stages

log = logging.getLogger(__name__)


@dataclass
class StepReporter:
    """The ``callback_on_step_end`` of every stage of one job."""

    total: int
    on_progress: ProgressFn
    should_stop: StopFn
    preview: bool = False
    crop: tuple[int, int] | None = None  # latent rows/cols of the work image (without padding)
    mask: LatentMask | None = None
    on_step: Callable[[], None] | None = None  # e.g. the memory placement's release()
    dtype: torch.dtype = torch.float32  # the pipelines' latent dtype (their noise is drawn in it)
    done: int = 0

    def __call__(self, pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.done += 1
        out: dict[str, Any] = {}
        latents = kwargs["latents"]
        if self.mask is not None:
            latents = out["latents"] = self.mask.blend(latents, pipe.scheduler, i, t)
        if self.on_step is not None:
            self.on_step()
        preview = None
        if self.preview:
            rows, cols = self.crop or tuple(latents.shape[-2:])
            preview = latents_to_preview(latents[..., :rows, :cols])
        self.on_progress(self.done, self.total, preview)
        if self.should_stop():
            raise JobCancelled()
        return out


def default_stages(req: RefineRequest) -> Stages:
    """A refine: the refiner alone, img2img on the source."""
    return Stages("refine", req.plan.steps, 0, req.plan.denoise_steps, refiner_strength=req.strength)


def initial_noise(generator: torch.Generator, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The noise a pipeline called now with ``generator`` draws first (its ``prepare_latents``:
    ``randn_tensor(latents' shape, generator, device, dtype)``), without consuming the generator."""
    peek = torch.Generator(generator.device)
    peek.set_state(generator.get_state())
    return randn_tensor(tuple(like.shape), generator=peek, device=like.device, dtype=dtype)


@contextmanager
def inpaint_draw(pipe: Any, like: torch.Tensor) -> Iterator[None]:
    """While ``pipe`` runs: one latent-sized draw from its generator after its noise, before its first step.

    Stock's inpaint pipeline encodes the masked picture (``prepare_mask_latents``: a VAE latent *sampled*
    with the job's generator) between drawing the noise and the first scheduler step, even where its UNet
    never reads that latent. The img2img pipeline calls ``prepare_extra_step_kwargs`` at that very point,
    so the draw goes there; the sample is thrown away, the generator moves on as stock's does."""
    own = pipe.prepare_extra_step_kwargs

    def with_draw(generator: Any, eta: Any) -> Any:
        if generator is not None:
            randn_tensor(tuple(like.shape), generator=generator, device=like.device, dtype=torch.float32)
        return own(generator, eta)

    pipe.prepare_extra_step_kwargs = with_draw
    try:
        yield
    finally:
        del pipe.prepare_extra_step_kwargs  # the class's own again


def _run(
    pipe: Any,
    reporter: StepReporter,
    expected: int,
    what: str,
    draws_noise: bool = True,
    on_source: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """Run one pipeline; ``draws_noise``: it starts by drawing its initial noise (every pipeline here
    but the refiner that takes over at the split, which continues from the base's latents). ``on_source``:
    it runs img2img on the source picture (with a mask, stock's inpaint pipeline would encode it)."""
    if reporter.mask is not None and draws_noise:
        reporter.mask.use_noise(initial_noise(kwargs["generator"], reporter.mask.source, reporter.dtype))
    before = reporter.done
    draw = inpaint_draw(pipe, reporter.mask.source) if reporter.mask is not None and on_source else nullcontext()
    with draw:
        result = pipe(callback_on_step_end=reporter, callback_on_step_end_tensor_inputs=["latents"], **kwargs)
    ran = reporter.done - before
    if ran != expected:
        log.warning("the %s ran %d denoising steps, the step plan said %d", what, ran, expected)
    return result.images


def job_generator(seed: int) -> torch.Generator:
    """The job's generator (on the CPU, so a seed gives the same picture on every device)."""
    return torch.Generator("cpu").manual_seed(seed)


def run_stages(
    models: Any,
    stages: Stages,
    source: torch.Tensor,
    req: RefineRequest,
    reporter: StepReporter,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoise: ``source`` are the scaled source latents (1, 4, h, w); returns the final latents.
    ``models`` gives the pipelines (``refiner``, ``base``, ``base_img2img()``), loading them on demand.
    ``generator``: the job's (None: a fresh one from ``req.seed``), after any draw for the source."""
    generator = generator if generator is not None else job_generator(req.seed)
    reporter.dtype = dtype
    common: dict[str, Any] = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt or None,
        "guidance_scale": req.guidance_scale,
        "generator": generator,
        "output_type": "latent",
    }
    split = float(stages.split) if stages.split is not None else None
    latents = source.to(dtype)
    if stages.base_steps:
        if stages.base_from_source:
            latents = _run(
                models.base_img2img(),
                reporter,
                stages.base_steps,
                "base (img2img)",
                on_source=True,
                image=latents,
                strength=req.strength,
                num_inference_steps=stages.steps,
                denoising_end=split,
                **common,
            )
        else:
            rows, cols = source.shape[-2:]
            latents = _run(
                models.base,
                reporter,
                stages.base_steps,
                "base",
                height=rows * 8,
                width=cols * 8,
                num_inference_steps=stages.steps,
                denoising_end=split,
                **common,
            )
    if not stages.refiner_steps:
        return latents
    refiner_args: dict[str, Any] = {
        "aesthetic_score": req.aesthetic_score,
        "negative_aesthetic_score": req.negative_aesthetic_score,
        "num_inference_steps": stages.steps,
        "image": latents.to(dtype),
    }
    takes_over = stages.mode == "generate" and bool(stages.base_steps)
    if takes_over:  # the ensemble's hand-over at the split: no new noise
        refiner_args.update(strength=1.0, denoising_start=split)
    else:  # img2img on the source (refine) or on the base's picture (two_stage)
        refiner_args.update(strength=stages.refiner_strength)
    on_source = not takes_over and not stages.base_steps  # a refine: img2img on the source picture
    return _run(
        models.refiner, reporter, stages.refiner_steps, "refiner", not takes_over, on_source, **refiner_args, **common
    )
