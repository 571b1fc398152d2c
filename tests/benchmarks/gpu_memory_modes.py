"""GPU check of the memory modes, the out-of-memory path and unloading (needs CUDA; not part of CI).

Part 1 runs the tiny demo models through every memory mode (refine, generate, masked refine), forces
a real CUDA out-of-memory error and the --oom-retry step-down, and unloads the base. Part 2 builds
random-weight pipelines of the real SDXL 1.0 architecture from the shipped configs and times one
refine (1024x1024, 50 steps, strength 0.3) and one ensemble generate (40 steps, split 0.8) per mode,
with the peak GPU memory. Results: one JSON object per line on stdout and in OUT/memory_modes.jsonl.

    python tests/benchmarks/gpu_memory_modes.py [OUT_DIR] [--skip-real]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.backend.engine.stages import plan_job
from krita_sdxl.backend.models import oom
from krita_sdxl.backend.models.memory import MODES, Placement
from krita_sdxl.backend.models.model_set import ModelSet
from krita_sdxl.backend.models.sources import SHIPPED_CONFIGS
from krita_sdxl.protocol import Image, ImageSpec

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else Path(".")
GIB = 2**30


def emit(**record: Any) -> None:
    line = json.dumps(record, default=str)
    print(line, flush=True)
    with open(OUT / "memory_modes.jsonl", "a") as f:
        f.write(line + "\n")


def image(size: int, seed: int = 0) -> Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x ^ y) % 256], -1) + rng.integers(0, 30, (size, size, 3))
    data = np.concatenate([np.clip(rgb, 0, 255), np.full((size, size, 1), 255)], -1).astype(np.uint8)
    return Image(ImageSpec(size, size, "RGBA", 8), data.tobytes())


def request(engine: Engine, mode: str, img: Image, steps: int, strength: float, **kw: Any) -> RefineRequest:
    plan, stages = plan_job(mode, steps, strength, 0.8, engine.timesteps)
    return RefineRequest(
        img, "a castle on a hill", "", strength, plan, 7, 5.0, 6.0, 2.5, mode=mode, stages=stages, **kw
    )


def timed(engine: Engine, req: RefineRequest) -> tuple[bytes, float, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = engine.refine(req, lambda *a: None, lambda: False)
    torch.cuda.synchronize()
    return bytes(out.data), time.perf_counter() - t0, torch.cuda.max_memory_allocated()


def tiny(cache: Path) -> None:
    reference: dict[str, bytes] = {}
    img = image(128)  # at most the demo VAE's sample size: no VAE tiling, so every mode gives the same pixels
    wide = image(256)
    mask = np.zeros((256, 256), np.uint8)
    mask[64:192, 64:192] = 255
    mask_img = Image(ImageSpec(256, 256, "L"), mask.tobytes())
    for mode in MODES:
        engine = Engine.load(demo=True, device="cuda", memory=mode, cache_dir=cache, speed="off")
        for job in ("refine", "generate"):
            req = request(engine, job, img, 10, 0.5 if job == "refine" else 1.0)
            data, seconds, peak = timed(engine, req)
            data2, seconds2, _ = timed(engine, req)
            reference.setdefault(job, data)
            diff = np.abs(np.frombuffer(data, np.uint8).astype(int) - np.frombuffer(reference[job], np.uint8)).max()
            emit(
                part="tiny",
                memory=mode,
                job=job,
                first_s=round(seconds, 3),
                warm_s=round(seconds2, 3),
                peak_mib=peak // 2**20,
                after_job_mib=torch.cuda.memory_allocated() // 2**20,
                max_diff_vs_none=int(diff),
                repeatable=data == data2,
            )
        out = engine.refine(request(engine, "refine", wide, 10, 0.6, mask=mask_img), lambda *a: None, lambda: False)
        a = np.frombuffer(bytes(out.data), np.uint8).reshape(256, 256, 4)[..., :3].astype(int)
        b = np.frombuffer(bytes(wide.data), np.uint8).reshape(256, 256, 4)[..., :3].astype(int)
        emit(part="tiny", memory=mode, job="masked refine", outside_max_diff=int(np.abs(a - b)[mask == 0].max()))
        before = torch.cuda.memory_allocated()
        engine.unload("base")
        emit(part="tiny", memory=mode, job="unload base", freed_kib=(before - torch.cuda.memory_allocated()) // 1024)
        del engine
        oom.free_memory()

    auto = Engine.load(demo=True, device="cuda", memory="auto", cache_dir=cache, speed="off")
    emit(part="tiny", job="auto", memory=auto.describe()["memory"])

    retry = Engine.load(demo=True, device="cuda", cache_dir=cache, speed="off", oom_retry=True, simulate_oom=1)
    data, _, _ = timed(retry, request(retry, "refine", img, 10, 0.5))
    emit(part="tiny", job="oom retry", memory=retry.describe()["memory"], same_pixels=data == reference["refine"])

    engine = Engine.load(demo=True, device="cuda", cache_dir=cache, speed="off")
    total = torch.cuda.get_device_properties(0).total_memory
    oom.free_memory()  # a cap just above what the weights hold: a 2048x2048 job (not tiled) cannot fit
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 32 * 2**20) / total)
    try:
        engine.refine(request(engine, "refine", image(2048), 4, 0.5), lambda *a: None, lambda: False)
        emit(part="tiny", job="real oom", error=None)
    except oom.OutOfMemoryError as exc:
        emit(part="tiny", job="real oom", error=str(exc)[:300], allocated_after_mib=torch.cuda.memory_allocated() >> 20)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    data, _, _ = timed(engine, request(engine, "refine", img, 10, 0.5))
    emit(part="tiny", job="after oom", same_pixels=data == reference["refine"])


def real_pipelines() -> tuple[Any, Any]:
    """Random-weight SDXL 1.0 refiner and base (real architecture, shipped configs), fp16, VAE bf16, on the CPU."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def build(fn: Any, dtype: torch.dtype) -> Any:
        with torch.device("cuda"):
            module = fn().to(dtype)
        return module.eval().to("cpu")

    r, b = SHIPPED_CONFIGS["refiner"], SHIPPED_CONFIGS["base"]
    half = torch.float16

    def unet(folder: Path) -> Any:
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))

    def text(cls: Any, folder: Path) -> Any:
        return cls(CLIPTextConfig.from_pretrained(folder))

    vae = build(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(r / "vae")), torch.bfloat16)
    te2 = build(lambda: text(CLIPTextModelWithProjection, r / "text_encoder_2"), half)
    te1 = build(lambda: text(CLIPTextModel, b / "text_encoder"), half)
    unet_r, unet_b = build(lambda: unet(r), half), build(lambda: unet(b), half)
    tok2 = CLIPTokenizer.from_pretrained(r / "tokenizer_2")
    tok1 = CLIPTokenizer.from_pretrained(b / "tokenizer")
    sched = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(r / "scheduler"))
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae, None, te2, None, tok2, unet_r, sched, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
    )
    base_sched = EulerDiscreteScheduler.from_config(sched.config)
    base = StableDiffusionXLPipeline(vae, te1, te2, tok1, tok2, unet_b, base_sched)
    for p in (refiner, base):
        p.set_progress_bar_config(disable=True)
    return refiner, base


def real(deadline: float) -> None:
    t0 = time.perf_counter()
    refiner, base = real_pipelines()
    emit(part="real", job="build", seconds=round(time.perf_counter() - t0, 1))
    img = image(1024)
    for mode in MODES:
        if time.perf_counter() > deadline:
            emit(part="real", memory=mode, skipped="out of time")
            continue
        placement = Placement(mode, "cuda")
        models = ModelSet(placement, torch.float16, torch.bfloat16, refiner_pipe=refiner)
        models.put("base", base)
        engine = Engine(refiner, "cuda", torch.float16, torch.bfloat16, models=models)
        jobs = [("refine", 50, 0.3)] + ([("generate", 40, 1.0)] if mode != "sequential" else [])
        for job, steps, strength in jobs:
            req = request(engine, job, img, steps, strength)
            _, first, peak = timed(engine, req)
            warm = timed(engine, req)[1] if mode != "sequential" else first
            peak = torch.cuda.max_memory_allocated() if mode != "sequential" else peak
            emit(
                part="real",
                memory=mode,
                job=f"{job} 1024x1024, {req.plan.denoise_steps} UNet calls",
                first_s=round(first, 2),
                warm_s=round(warm, 2),
                peak_gib=round(peak / GIB, 2),
                idle_gib=round(torch.cuda.memory_allocated() / GIB, 2),
            )
        placement.clear()
        del engine, models, placement
        oom.free_memory()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    emit(part="env", gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        tiny(Path(os.environ.get("KRITA_SDXL_CACHE", tmp)))
    emit(part="tiny", job="done", seconds=round(time.perf_counter() - start, 1))
    if "--skip-real" not in sys.argv:
        real(start + float(os.environ.get("REAL_BUDGET_S", "330")))


if __name__ == "__main__":
    main()
