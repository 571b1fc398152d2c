"""Generate (ensemble of experts), two-stage and masked refine on the tiny demo refiner and base."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from krita_sdxl.backend.engine import pixels
from krita_sdxl.backend.engine.request import JobCancelled, RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.backend.engine.stages import plan_job, scheduler_timesteps
from krita_sdxl.protocol import Image, ImageSpec, plan_img2img


@pytest.fixture(scope="module")
def engine(demo_models: Any) -> Engine:
    return Engine.load(demo=True, device="cpu", cache_dir=demo_models.refiner.parent.parent, speed="off")


def make_image(width: int = 64, height: int = 48, seed: int = 0) -> Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=-1)
    noise = rng.integers(0, 40, (height, width, 3))
    alpha = np.full((height, width, 1), 255)
    data = np.concatenate([np.clip(rgb + noise, 0, 255), alpha], axis=-1).astype(np.uint8)
    return Image(ImageSpec(width, height, "RGBA", 8), data.tobytes())


def request(engine: Engine, mode: str, image: Image | None = None, **kw: Any) -> RefineRequest:
    steps, strength, split = kw.pop("steps", 10), kw.pop("strength", 1.0), kw.pop("denoising_end", 0.8)
    if mode == "refine":
        plan, stages = plan_img2img(steps, strength), None
    else:
        plan, stages = plan_job(mode, steps, strength, split, engine.timesteps)
    fields: dict[str, Any] = {
        "prompt": "a photo of a cat",
        "negative_prompt": "blurry",
        "strength": strength,
        "plan": plan,
        "seed": 3,
        "guidance_scale": 5.0,
        "aesthetic_score": 6.0,
        "negative_aesthetic_score": 2.5,
        "mode": mode,
        "stages": stages,
    }
    fields.update(kw)
    return RefineRequest(image=image or make_image(), **fields)


class Calls:
    """UNet calls per model (with the latent size each saw) and progress events."""

    def __init__(self) -> None:
        self.unet: dict[str, list[tuple[int, int]]] = {"base": [], "refiner": []}
        self.progress: list[tuple[int, int]] = []

    def on_progress(self, step: int, total: int, preview: Image | None) -> None:
        self.progress.append((step, total))


@contextmanager
def watched(engine: Engine) -> Iterator[Calls]:
    calls = Calls()
    hooks = []
    for role in ("base", "refiner"):
        unet = engine.models.get(role).unet

        def hook(module: Any, args: Any, role: str = role) -> None:
            calls.unet[role].append(tuple(args[0].shape[-2:]))

        hooks.append(unet.register_forward_pre_hook(hook))
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def run(engine: Engine, req: RefineRequest, calls: Calls | None = None) -> bytes:
    out = engine.refine(req, calls.on_progress if calls else lambda *a: None, lambda: False)
    assert out.spec == req.image.spec
    return bytes(out.data)


def rgb_of(data: bytes, spec: ImageSpec) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(spec.height, spec.width, 4)[..., :3].astype(np.int16)


# --- planning -----------------------------------------------------------------------------------


def test_plans_follow_diffusers_step_arithmetic() -> None:
    timesteps = scheduler_timesteps()
    plan, stages = plan_job("generate", 10, 1.0, 0.8, timesteps)
    assert (stages.base_steps, stages.refiner_steps, plan.denoise_steps) == (8, 2, 10)
    plan, stages = plan_job("generate", 40, 1.0, 0.8, timesteps)  # FACTS: 32 base + 8 refiner
    assert (stages.base_steps, stages.refiner_steps) == (32, 8)
    plan, stages = plan_job("generate", 10, 0.5, 0.8, timesteps)  # img2img base: 5 re-run, 3 above the split
    assert (stages.base_steps, stages.refiner_steps, stages.base_from_source) == (3, 2, True)
    plan, stages = plan_job("generate", 10, 0.2, 0.8, timesteps)  # all below the split: a plain refine
    assert (stages.base_steps, stages.refiner_steps, plan.denoise_steps) == (0, 2, 2)
    plan, stages = plan_job("generate", 1, 1.0, 0.8, timesteps)  # 1 step lies below the split: steps raised
    assert plan.adjusted and stages.base_steps >= 1 and plan.steps > 1
    plan, stages = plan_job("generate", 10, 1.0, 1.0, timesteps)  # denoising_end 1: the base alone
    assert (stages.base_steps, stages.refiner_steps, stages.split) == (10, 0, None)
    plan, stages = plan_job("two_stage", 10, 0.3, 0.8, timesteps)
    assert (stages.base_steps, stages.refiner_steps, plan.denoise_steps) == (10, 3, 13)


# --- generate (ensemble of experts) ---------------------------------------------------------------


def test_the_base_loads_with_the_first_job_that_needs_it(engine: Engine) -> None:
    engine.unload("base")
    assert not engine.models.loaded("base")
    run(engine, request(engine, "refine", strength=0.3))
    assert not engine.models.loaded("base")
    run(engine, request(engine, "generate"))
    assert engine.models.loaded("base")
    assert [m["loaded"] for m in engine.live_capabilities()["models"]] == [True, True]


def test_generate_runs_base_then_refiner_at_the_work_size(engine: Engine) -> None:
    image = make_image(40, 24)
    req = request(engine, "generate", image, work_size=(64, 48), preview=True)
    with watched(engine) as calls:
        out = run(engine, req, calls)
    assert len(calls.unet["base"]) == 8 and len(calls.unet["refiner"]) == 2
    assert set(calls.unet["base"]) == set(calls.unet["refiner"]) == {(6, 8)}  # 64x48 px -> 8x6 latents
    assert calls.progress == [(i, 10) for i in range(1, 11)]  # one total over both models
    alpha_in = np.frombuffer(bytes(image.data), np.uint8)[3::4]
    assert np.array_equal(np.frombuffer(out, np.uint8)[3::4], alpha_in)
    assert run(engine, req) == out  # same seed, same pixels
    assert run(engine, request(engine, "generate", image, work_size=(64, 48), seed=4)) != out


def test_generate_from_noise_ignores_the_source_colours(engine: Engine) -> None:
    first = run(engine, request(engine, "generate", make_image(seed=1)))
    second = run(engine, request(engine, "generate", make_image(seed=2)))
    assert first == second


def test_generate_with_a_source_runs_the_base_as_img2img(engine: Engine) -> None:
    req = request(engine, "generate", strength=0.5)
    with watched(engine) as calls:
        out = run(engine, req, calls)
    assert (len(calls.unet["base"]), len(calls.unet["refiner"])) == (3, 2)
    assert calls.progress[-1] == (5, 5)
    other = run(engine, request(engine, "generate", make_image(seed=9), strength=0.5))
    assert out != other  # the source matters below strength 1


def test_two_stage_generates_then_refines(engine: Engine) -> None:
    req = request(engine, "two_stage", strength=0.3)
    with watched(engine) as calls:
        run(engine, req, calls)
    assert (len(calls.unet["base"]), len(calls.unet["refiner"])) == (10, 3)
    assert calls.progress[-1] == (13, 13)


def test_cancel_in_the_base_stage_stops_before_the_refiner(engine: Engine) -> None:
    req = request(engine, "generate", steps=20)
    with watched(engine) as calls, pytest.raises(JobCancelled):
        engine.refine(req, calls.on_progress, lambda: len(calls.progress) >= 2)
    assert len(calls.unet["base"]) == 2 and calls.unet["refiner"] == []


# --- masked refine ------------------------------------------------------------------------------


def box_mask(width: int = 64, height: int = 48) -> tuple[np.ndarray, Image]:
    m = np.zeros((height, width), np.uint8)
    m[12:36, 16:48] = 255
    return m, Image(ImageSpec(width, height, "L"), m.tobytes())


@pytest.mark.parametrize("mode", ["refine", "generate"])
def test_masked_job_keeps_the_pixels_outside_the_mask(engine: Engine, mode: str) -> None:
    image = make_image()
    m, mask = box_mask()
    out = run(engine, request(engine, mode, image, mask=mask, strength=0.6, feather=4.0))
    before, after = rgb_of(bytes(image.data), image.spec), rgb_of(out, image.spec)
    assert np.abs(after - before)[m == 0].max() <= 1  # within one level (in fact untouched)
    assert np.abs(after - before)[m > 0].mean() > 5  # the inside was re-done
    alpha = np.frombuffer(out, np.uint8)[3::4].reshape(48, 64)
    assert np.all(alpha[m == 0] == 0)  # and the alpha compositing with feather still applies


@pytest.mark.parametrize(
    ("mode", "strength"), [("generate", 1.0), ("two_stage", 0.3), ("generate", 0.6), ("refine", 0.6)]
)
def test_a_job_that_paints_from_noise_paints_into_an_empty_layer(engine: Engine, mode: str, strength: float) -> None:
    """An empty layer (alpha 0 everywhere): generate at strength 1 and two-stage give the selection's
    alpha (they owe nothing to the source's pixels); jobs from the source keep its alpha, 0 here."""
    empty = Image(ImageSpec(64, 48, "RGBA", 8), bytes(64 * 48 * 4))
    m, mask = box_mask()
    out = run(engine, request(engine, mode, empty, mask=mask, strength=strength))
    alpha = np.frombuffer(out, np.uint8)[3::4].reshape(48, 64)
    if mode == "two_stage" or strength >= 1.0:
        assert np.array_equal(alpha, m)  # opaque in the selection, nothing outside
        assert rgb_of(out, empty.spec)[m > 0].std() > 5  # and painted
    else:
        assert not alpha.any()
    whole = run(engine, request(engine, mode, empty, strength=strength))  # no selection
    assert bool(np.frombuffer(whole, np.uint8)[3::4].min() == 255) == (mode == "two_stage" or strength >= 1.0)


def test_latent_masking_holds_the_unmasked_latents_to_the_source(engine: Engine) -> None:
    image = make_image()
    _, mask = box_mask()
    decoded: list[torch.Tensor] = []
    hook = engine.vae.post_quant_conv.register_forward_pre_hook(lambda mod, args: decoded.append(args[0].clone()))
    try:
        run(engine, request(engine, "refine", image, mask=mask, strength=0.6))
        run(engine, request(engine, "refine", image, mask=mask, strength=0.6, keep_unmasked=False))
    finally:
        hook.remove()
    rgb, _ = pixels.to_rgb_alpha(image)
    with torch.inference_mode():
        # refine samples the source latent with the job's generator first, as stock img2img does
        source = engine._encode(rgb, torch.Generator("cpu").manual_seed(3)) / engine.vae.config.scaling_factor
    outside = torch.zeros(6, 8, dtype=torch.bool)
    outside[:1, :] = outside[5:, :] = True  # latent rows/cols wholly outside the 8 px aligned box
    outside[:, :2] = outside[:, 6:] = True
    held, free = decoded
    assert torch.allclose(held[0][:, outside], source[0][:, outside], atol=1e-5)
    assert not torch.allclose(held[0][:, ~outside], source[0][:, ~outside], atol=1e-2)
    assert not torch.allclose(free[0][:, outside], source[0][:, outside], atol=1e-2)  # switched off
