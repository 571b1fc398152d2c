"""Denoising a picture's latents in overlapping tiles at the refiner's native size, all tiles step by step.

The refiner runs img2img on one latent image for the whole picture (1/8 of its size a side: a 4096 px
picture's latents are 4 MB), but its UNet only ever sees one tile of it (128 latents = 1024 px, the
size the refiner was trained at). At every timestep the UNet predicts the noise of each tile in turn;
the predictions are blended into one prediction for the whole picture (each tile's share falls with a
cosine ramp across the overlaps: :class:`.tiling.TileWeights`), and the scheduler takes one step with
it (MultiDiffusion: Bar-Tal et al., 2023). Overlapping tiles therefore share their latents at every
step, and the noise is drawn once for the whole picture from the job's seed, so neighbouring tiles
agree where they overlap: no seams, and no blurred band where two independent results would be
averaged. The same seed, tile size and overlap give the same picture.

This is the refiner pipeline's own img2img loop (``StableDiffusionXLImg2ImgPipeline.__call__``:
prompt embeddings, aesthetic-score time ids, ``get_timesteps`` for the strength, ``add_noise``,
classifier-free guidance, ``scheduler.step``) with the UNet call split into tiles. Progress counts
tiles x UNet calls, and a job is cancellable between any two of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from krita_sdxl.protocol.geometry import Box

from .denoise import job_generator
from .preview import latents_to_preview
from .request import JobCancelled, ProgressFn, RefineRequest, StopFn
from .tiling import TileWeights


def _time_ids(pipe: Any, req: RefineRequest, height: int, width: int, dtype: torch.dtype, pooled_dim: int, cfg: bool):
    """The refiner's added time ids for a tile of ``height`` x ``width`` pixels (original and target size
    the tile's, crop at 0, 0: what the pipeline sends for an image of that size), negative first."""
    size = (height, width)
    ids, negative = pipe._get_add_time_ids(
        size, (0, 0), size, req.aesthetic_score, req.negative_aesthetic_score, size, (0, 0), size,
        dtype=dtype, text_encoder_projection_dim=pooled_dim,
    )  # fmt: skip
    return torch.cat([negative, ids], dim=0) if cfg else ids


def denoise_tiles(
    engine: Any,
    latents: torch.Tensor,
    tiles: Sequence[Box],
    req: RefineRequest,
    on_progress: ProgressFn,
    should_stop: StopFn,
) -> torch.Tensor:
    """img2img of ``latents`` (1, 4, h, w: the encoded picture, float32) at ``req.strength`` with
    ``req.plan.steps`` scheduler steps, the UNet run on each of ``tiles`` (latent boxes covering the
    latents) at every step. Returns the denoised latents (float32, same shape)."""
    pipe = engine.pipe
    unet = pipe.unet
    device = latents.device
    cfg = req.guidance_scale > 1.0 and unet.config.time_cond_proj_dim is None
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=req.prompt,
        device=pipe._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=req.negative_prompt or None,
    )
    pooled_dim = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
    if cfg:
        embeds, pooled = torch.cat([negative, embeds], dim=0), torch.cat([negative_pooled, pooled], dim=0)
    embeds, pooled = embeds.to(device), pooled.to(device)
    time_ids: dict[tuple[int, int], torch.Tensor] = {}
    for box in tiles:
        key = (box.height, box.width)
        if key not in time_ids:
            time_ids[key] = _time_ids(pipe, req, box.height * 8, box.width * 8, embeds.dtype, pooled_dim, cfg).to(
                device
            )
    weights = TileWeights(tiles)
    shares = {box: torch.from_numpy(weights(box)).to(device)[None, None] for box in tiles}

    scheduler = pipe.scheduler
    scheduler.set_timesteps(req.plan.steps, device=device)
    timesteps, _ = pipe.get_timesteps(req.plan.steps, req.strength, device)
    generator = job_generator(req.seed)  # the noise is drawn once, for the whole picture
    noise = randn_tensor(tuple(latents.shape), generator=generator, device=device, dtype=torch.float32)
    latents = scheduler.add_noise(latents, noise, timesteps[:1])
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    total, done = len(tiles) * len(timesteps), 0
    for t in timesteps:
        prediction = torch.zeros_like(latents)
        for box in tiles:
            region = (..., slice(box.y, box.bottom), slice(box.x, box.right))
            tile = latents[region]
            sample = torch.cat([tile, tile]) if cfg else tile
            sample = scheduler.scale_model_input(sample, t).to(engine.unet_dtype)
            # one tile: the loop's own timestep (a step cache sees consecutive steps); several: a copy,
            # so no cache ever takes one tile's features for another's
            step_t = t if len(tiles) == 1 else t.clone()
            added = {"text_embeds": pooled, "time_ids": time_ids[(box.height, box.width)]}
            out = unet(sample, step_t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
            out = out.float()
            if cfg:
                uncond, text = out.chunk(2)
                out = uncond + req.guidance_scale * (text - uncond)
            prediction[region] += out * shares[box]
            engine.models.placement.release()
            done += 1
            on_progress(done, total, latents_to_preview(tile) if req.preview else None)
            if should_stop():
                raise JobCancelled()
        latents = scheduler.step(prediction, t, latents, **extra, return_dict=False)[0].float()
    return latents
