"""Masked refine holds the unmasked latents where diffusers' inpaint pipeline holds them, for any scheduler.

After step i the held latents must be ``scheduler.add_noise(source, noise, timesteps[i + 1])`` with
the job's own initial noise (the tensor the pipeline noised the source with), and the clean source
after the last step. The source latent and the noise are computed here as stock img2img draws them:
the VAE latent sampled with the job's generator, then the noise from the same generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.protocol import Image, ImageSpec, plan_img2img

SCHEDULERS = ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler", "UniPCMultistepScheduler"]
W, H, SEED, STEPS, STRENGTH = 64, 48, 5, 10, 0.5


@pytest.fixture(scope="module")
def engine(demo_models: Any) -> Engine:
    cache = demo_models.refiner.parent.parent
    return Engine.load(demo=True, device="cpu", cache_dir=cache, speed="off", watermark=False)


def picture() -> np.ndarray:
    rng = np.random.default_rng(2)
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 255 // W, y * 255 // H, (x * y) % 256], axis=-1) + rng.integers(0, 30, (H, W, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def request(rgb: np.ndarray, mask: np.ndarray) -> RefineRequest:
    data = np.concatenate([rgb, np.full((H, W, 1), 255, np.uint8)], axis=-1)
    image = Image(ImageSpec(W, H, "RGBA", 8), data.tobytes())
    mask_image = Image(ImageSpec(W, H, "L"), mask.astype(np.uint8).tobytes())
    plan = plan_img2img(STEPS, STRENGTH)
    return RefineRequest(image, "a photo of a cat", "blurry", STRENGTH, plan, SEED, 5.0, 6.0, 2.5, mask=mask_image)


def stock_source_and_noise(engine: Engine, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """What stock img2img's prepare_latents draws: the sampled, scaled VAE latent, then the noise."""
    g = torch.Generator("cpu").manual_seed(SEED)
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2.0 - 1.0
    with torch.inference_mode():
        source = engine.vae.encode(x).latent_dist.sample(g) * engine.vae.config.scaling_factor
    return source, randn_tensor(tuple(source.shape), generator=g, dtype=source.dtype)


@contextmanager
def scheduler(engine: Engine, name: str) -> Iterator[Any]:
    """The refiner runs with the ``name`` scheduler (from its own config); records every step's
    (timestep, the latents the step starts from)."""
    import diffusers

    saved = engine.pipe.scheduler
    sched = getattr(diffusers, name).from_config(saved.config)
    sched.seen = []
    step = sched.step

    def recording_step(model_output: Any, timestep: Any, sample: torch.Tensor, *a: Any, **k: Any) -> Any:
        sched.seen.append((timestep, sample.clone()))
        return step(model_output, timestep, sample, *a, **k)

    sched.step = recording_step
    engine.pipe.scheduler = sched
    try:
        yield sched
    finally:
        engine.pipe.scheduler = saved


@contextmanager
def decoded(engine: Engine) -> Iterator[list[torch.Tensor]]:
    """The final latents, scaled as the sampler sees them (from the VAE decoder's input)."""
    found: list[torch.Tensor] = []
    factor = engine.vae.config.scaling_factor
    hook = engine.vae.post_quant_conv.register_forward_pre_hook(lambda m, args: found.append(args[0] * factor))
    try:
        yield found
    finally:
        hook.remove()


@contextmanager
def oracle(engine: Engine, noise: torch.Tensor) -> Iterator[None]:
    """The refiner's UNet predicts the true noise (a perfect epsilon model for this source): every
    deterministic scheduler then lands exactly on add_noise(source, noise, t_next) everywhere."""

    def perfect(module: Any, args: Any, output: Any) -> tuple[torch.Tensor]:
        return (noise.expand(args[0].shape[0], -1, -1, -1).to(args[0].dtype),)

    hook = engine.pipe.unet.register_forward_hook(perfect)
    try:
        yield
    finally:
        hook.remove()


def noised(sched: Any, source: torch.Tensor, noise: torch.Tensor, timestep: Any) -> torch.Tensor:
    fresh = type(sched).from_config(sched.config)
    fresh.set_timesteps(STEPS)
    return fresh.add_noise(source, noise, torch.as_tensor([timestep]).reshape(1))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_the_unmasked_latents_are_held_at_the_next_noise_level_with_the_jobs_noise(engine: Engine, name: str) -> None:
    rgb = picture()
    mask = np.zeros((H, W))
    mask[:, 24:] = 255  # latent columns 0-2 are held, 3-7 re-done
    source, noise = stock_source_and_noise(engine, rgb)
    with scheduler(engine, name) as sched, decoded(engine) as final:
        engine.refine(request(rgb, mask), lambda *a: None, lambda: False)
    assert len(sched.seen) == int(STEPS * STRENGTH)
    (t0, first), *later = sched.seen
    # the pipeline starts from stock's latents: the sampled source noised with the second draw
    assert torch.allclose(first, noised(sched, source, noise, t0), atol=1e-5)
    held = (slice(None), slice(None), slice(None), slice(0, 3))
    for t, latents in later:
        assert torch.allclose(latents[held], noised(sched, source, noise, t)[held], atol=1e-5), f"{name} at t={t}"
    assert torch.allclose(final[0][held], source[held], atol=1e-5)  # clean after the last step
    assert not torch.allclose(final[0][..., 3:], source[..., 3:], atol=1e-2)  # the masked part was re-done


@pytest.mark.parametrize("name", SCHEDULERS)
def test_soft_mask_edges_keep_the_full_noise_level(engine: Engine, name: str) -> None:
    """Where the mask is half on, the blend of the model's latents and the held ones must carry one
    noise at full strength (two independent noises would average to 0.71 of it)."""
    rgb = picture()
    mask = np.tile(np.linspace(0, 255, W), (H, 1))  # every level from held (0) to re-done (1)
    mask[:, W // 2 - 8 : W // 2 + 8] = 128  # and a band at 0.5
    source, noise = stock_source_and_noise(engine, rgb)
    with scheduler(engine, name) as sched, decoded(engine) as final, oracle(engine, noise):
        engine.refine(request(rgb, mask), lambda *a: None, lambda: False)
    band = (slice(None), slice(None), slice(None), slice(W // 16 - 1, W // 16 + 1))  # latent columns at m = 0.5
    for t, latents in sched.seen[1:]:
        expected = noised(sched, source, noise, t)
        level = noised(sched, source, torch.ones_like(noise), t) - noised(sched, source, torch.zeros_like(noise), t)
        residual = (latents - noised(sched, source, torch.zeros_like(noise), t)) / level
        ratio = float(residual[band].std() / noise[band].std())
        assert abs(ratio - 1.0) < 0.02, f"{name} at t={t}: the m=0.5 band carries {ratio:.2f} of the noise"
        assert torch.allclose(latents, expected, atol=1e-4), f"{name} at t={t}"
    assert torch.allclose(final[0], source, atol=1e-4)
