"""GPU benchmark: stock diffusers vs this project's path, on the real SDXL architectures with random weights.

    python tests/benchmarks/bench_gpu.py --out DIR [--budget 500]   # on CUDA (one H100: about 8 minutes)
    python tests/benchmarks/bench_gpu.py --tiny --out DIR           # tiny shapes on the CPU: smoke test

On a lent GPU machine without diffusers or pyzmq: put their wheels and this project's (``pip wheel
--no-deps -w .whl .``) in ``.whl/``, carry it, install them with ``pip install --no-index --no-deps
--target /tmp/site .whl/*.whl`` and run with ``PYTHONPATH=/tmp/site`` (2026-11-26: 425 s with --budget 550).

Speed and memory do not depend on the weight values, so no checkpoint is needed. The refiner and the base
are built in the real SDXL 1.0 architectures (configs copied from ../shared/bench/sdxl_baseline.py), saved
with ``save_pretrained`` and loaded back through the project's own loading code (``Engine.load`` and
``krita-sdxl serve --model DIR``). Stages, in order, each skipped ("skipped: time") when the wall-clock
budget would not hold it; results.json under --out is rewritten after every figure, so a run that is cut
off still returns what it measured:

 1. build + save the refiner and the base (fp16 weights, like the real fp16 variant)
 2. stock diffusers, eager: refine 1024x1024 (50 steps x 0.3) and the ensemble (40 steps, split 0.8)
 3. this project, plain path (--speed off), in process: refine, and where its time goes (one UNet call,
    VAE encode, VAE decode)
 4. this project's service with the speed path (default options: regional compilation, dynamic sizes),
    cold compile cache: request-to-result over ZeroMQ (first = compile, warm, warm with new prompts),
    the quality check against the plain path's image, then a sweep of 10 selection sizes with the
    compilations counted
 5. a restarted service on the same compile cache: start to first result; then the speed-path ensemble
 6. the plain ensemble and the ``balanced`` memory mode (same and new prompts, peak memory, its pixels
    against the plain path's: its VAE runs in tiles)
 7. the speed path in process on the warm cache: where its time goes
 8. if time is left: the whole-graph variant (static shapes, CUDA graphs), cold, for the A/B figure
 9. with --vae-ab, if time is left: the VAE decoder, compiled, NCHW vs channels_last

Prints one table at the end and writes results.json and table.md under --out; with --results-dir also
<date>-<card>-gpu.json and .md there (the repository's tests/benchmarks/results/).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24),
    cross_attention_dim=1280, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)  # fmt: skip
BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)  # fmt: skip
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              projection_dim=768)  # fmt: skip
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
              projection_dim=1280)  # fmt: skip
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                 prediction_type="epsilon")  # fmt: skip

PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry"
REFINE = dict(prompt=PROMPT, negative_prompt=NEGATIVE, strength=0.3, steps=50, guidance_scale=5.0, seed=1)
ENSEMBLE = dict(REFINE, mode="generate", strength=1.0, steps=40, denoising_end=0.8, seed=2)
# Ten selection sizes as the plugin sends them (about 1 MP, multiples of 8), for the recompile count.
SWEEP = [(1000, 1000), (960, 1016), (1016, 960), (896, 1152), (1152, 896),
         (1280, 816), (816, 1280), (1024, 768), (768, 1024), (1152, 1152)]  # fmt: skip
TINY_SWEEP = [(w // 8, h // 8) for w, h in SWEEP]
GOALS = {"refine_s": 0.55, "ensemble_s": 1.5, "balanced_GiB": 6.0, "balanced_time_ratio": 1.3, "warm_start_s": 20.0}
FACTS_H100 = {  # ../shared/bench/2026-11-26-h100-diffusers-0.42.1.json (not re-measured here)
    "stock_refine_compiled_s": 0.8023,
    "stock_compile_first_call_s": 105.2,
    "stock_model_offload_s": 3.6587,
    "stock_model_offload_peak_GiB": 5.52,
}


def tiny(cfg: dict[str, Any]) -> dict[str, Any]:
    """Same structure, toy widths (as in the shared baseline): for a CPU smoke test of this script."""
    c = dict(cfg)
    if "block_out_channels" in c and "cross_attention_dim" in c:
        n = len(c["block_out_channels"])
        refiner = cfg is REFINER_UNET
        c.update(block_out_channels=(32,) * n, attention_head_dim=(2,) * n, transformer_layers_per_block=1,
                 cross_attention_dim=32 if refiner else 64, addition_time_embed_dim=8, norm_num_groups=8,
                 sample_size=16,
                 projection_class_embeddings_input_dim=(32 + 5 * 8) if refiner else (32 + 6 * 8))  # fmt: skip
    elif "block_out_channels" in c:
        c.update(block_out_channels=(8, 8, 16, 16), norm_num_groups=8, sample_size=128)
    else:
        c.update(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    return c


def gib(n: float) -> float:
    return round(n / 2**30, 2)


class Bench:
    def __init__(self, out: Path, budget: float, device: str) -> None:
        self.out, self.budget, self.device = out, budget, device
        self.results: dict[str, Any] = {}
        self.results_name = "results.json"
        self.t0 = time.monotonic()

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def record(self, key: str, value: Any) -> None:
        self.results[key] = value
        print(f"[{time.monotonic() - self.t0:7.1f}s] {key} = {value}", flush=True)
        tmp = self.out / f"{self.results_name}.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / self.results_name)

    def stage(self, name: str, need: float, fn: Callable[[], None]) -> bool:
        """Run one stage if ``need`` seconds are left; record its error instead of raising."""
        if self.left() < need:
            self.record(f"{name}.status", f"skipped: time ({self.left():.0f} s left, {need:.0f} s needed)")
            return False
        t = time.monotonic()
        try:
            fn()
            self.record(f"{name}.status", f"ok in {time.monotonic() - t:.1f} s")
            return True
        except Exception as exc:  # a failed stage must not lose the others
            tb = traceback.format_exc()
            self.record(f"{name}.status", f"error: {type(exc).__name__}: {str(exc)[:500]}")
            self.record(f"{name}.traceback", tb[-3000:])
            return False

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def timeit(self, fn: Callable[[], Any], n: int) -> float:
        times = []
        for _ in range(n):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return round(statistics.median(times), 4)

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak(self, offset: int = 0) -> float | None:
        """Peak GPU memory since reset_peak, less ``offset`` bytes held by something else."""
        return gib(torch.cuda.max_memory_allocated() - offset) if self.device == "cuda" else None

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.device == "cuda" else 0


# --- models ---------------------------------------------------------------------------------------


def build_and_save(b: Bench, root: Path, is_tiny: bool, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from krita_sdxl.backend.models.demo import write_tokenizer

    cfg = tiny if is_tiny else (lambda c: c)
    toks = root / "tokenizers"
    write_tokenizer(toks / "tokenizer", pad_token="<|endoftext|>")
    write_tokenizer(toks / "tokenizer_2", pad_token="!")
    tok_l = CLIPTokenizer.from_pretrained(toks / "tokenizer")
    tok_g = CLIPTokenizer.from_pretrained(toks / "tokenizer_2")
    torch.manual_seed(0)
    t = time.monotonic()
    with torch.device(b.device):
        unet_r = UNet2DConditionModel(**cfg(REFINER_UNET)).to(dtype).eval()
        unet_b = UNet2DConditionModel(**cfg(BASE_UNET)).to(dtype).eval()
        vae = AutoencoderKL(**cfg(VAE)).to(dtype).eval()
        te_g = CLIPTextModelWithProjection(CLIPTextConfig(**cfg(CLIP_G))).to(dtype).eval()
        te_l = CLIPTextModel(CLIPTextConfig(**cfg(CLIP_L))).to(dtype).eval()
    b.sync()
    b.record("build.init_s", round(time.monotonic() - t, 1))
    b.record(
        "build.params_M",
        {
            name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
            for name, m in (("refiner_unet", unet_r), ("base_unet", unet_b), ("vae", vae), ("te2", te_g))
        },
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te_g, tokenizer=None, tokenizer_2=tok_g, unet=unet_r,
        scheduler=EulerDiscreteScheduler(**SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )  # fmt: skip
    base = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te_l, text_encoder_2=te_g, tokenizer=tok_l, tokenizer_2=tok_g, unet=unet_b,
        scheduler=EulerDiscreteScheduler(**SCHEDULER), add_watermarker=False,
    )  # fmt: skip
    for p in (refiner, base):
        p.set_progress_bar_config(disable=True)
    t = time.monotonic()
    refiner.save_pretrained(root / "refiner")
    base.save_pretrained(root / "base")
    for folder, name in (
        (root / "refiner", "tokenizer_2"),
        (root / "base", "tokenizer"),
        (root / "base", "tokenizer_2"),
    ):
        shutil.rmtree(folder / name)
        shutil.copytree(toks / name, folder / name)
    b.record("build.save_s", round(time.monotonic() - t, 1))
    return {"refiner": refiner, "base": base}


# --- stock diffusers --------------------------------------------------------------------------------


def stock(b: Bench, pipes: dict[str, Any], size: int, ensemble_only: bool = False) -> None:
    refiner, base = pipes["refiner"], pipes["base"]
    dev = b.device
    g = torch.Generator(dev).manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=g, device=dev)

    def refine(steps: int = 50) -> Any:
        return refiner(PROMPT, negative_prompt=NEGATIVE, image=image, strength=0.3, num_inference_steps=steps,
                       guidance_scale=5.0, output_type="np", generator=torch.Generator(dev).manual_seed(1))  # fmt: skip

    def ensemble(steps: int = 40) -> Any:
        lat = base(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, denoising_end=0.8, height=size,
                   width=size, output_type="latent", generator=torch.Generator(dev).manual_seed(2)).images  # fmt: skip
        return refiner(PROMPT, negative_prompt=NEGATIVE, image=lat, num_inference_steps=steps, denoising_start=0.8,
                       output_type="np", generator=torch.Generator(dev).manual_seed(3))  # fmt: skip

    if not ensemble_only:
        refine(steps=10)
        b.reset_peak()
        b.record("stock.refine_s", b.timeit(refine, 3))
        b.record("stock.refine_peak_GiB", b.peak())
        return
    ensemble(steps=5)
    b.reset_peak()
    b.record("stock.ensemble_s", b.timeit(ensemble, 2))
    b.record("stock.ensemble_peak_GiB", b.peak())


# --- this project ---------------------------------------------------------------------------------------


def make_image(width: int, height: int, seed: int = 0) -> Any:
    """A smooth picture with some texture, RGBA 8-bit, as Krita would send it."""
    from krita_sdxl.protocol import Image, ImageSpec

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    rgb = np.stack([x / width, y / height, 0.5 + 0.4 * np.sin(x / 23.0) * np.cos(y / 17.0)], axis=-1)
    rgb = np.clip(rgb + rng.normal(0, 0.03, rgb.shape), 0, 1)
    rgba = np.concatenate([rgb, np.ones((height, width, 1), np.float32)], axis=-1)
    return Image(ImageSpec(width, height, "RGBA", 8), np.rint(rgba * 255).astype(np.uint8).tobytes())


def make_request(image: Any, params: dict[str, Any]) -> Any:
    """A RefineRequest exactly as the service builds it (through the codec)."""
    from krita_sdxl.backend.engine.request import RefineRequest
    from krita_sdxl.protocol import CLIENT, decode, encode

    msg = decode(CLIENT, encode(CLIENT, "submit", images={"image": image}, job="bench", **params))
    msg.images = {"image": image}  # protocol 2: the pixels follow in chunks

    msg.images = {"image": image}  # protocol 2: the pixels follow in chunks
    return RefineRequest.from_message(msg, params["seed"])


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parts(b: Bench, engine: Any, size: int, prefix: str) -> None:
    """Where a refine's time goes: one UNet call (CFG batch 2), one VAE encode, one VAE decode."""
    unet = engine.pipe.unet
    dev, dt = b.device, engine.unet_dtype
    lat = size // 8
    args = (torch.randn(2, 4, lat, lat, device=dev, dtype=dt), torch.tensor([500.0, 500.0], device=dev))
    cond = unet.config.cross_attention_dim
    extra = unet.config.projection_class_embeddings_input_dim - 5 * unet.config.addition_time_embed_dim
    kwargs = dict(
        encoder_hidden_states=torch.randn(2, 77, cond, device=dev, dtype=dt),
        added_cond_kwargs={"text_embeds": torch.randn(2, extra, device=dev, dtype=dt),
                           "time_ids": torch.randn(2, 5, device=dev, dtype=dt)},
    )  # fmt: skip
    rgb = np.random.default_rng(0).random((size, size, 3), dtype=np.float32)
    with torch.inference_mode():
        unet(*args, **kwargs)
        b.record(f"{prefix}.unet_call_s", b.timeit(lambda: unet(*args, **kwargs), 10))
        z = engine._encode(rgb)
        b.record(f"{prefix}.vae_encode_s", b.timeit(lambda: engine._encode(rgb), 5))
        engine._decode(z)
        b.record(f"{prefix}.vae_decode_s", b.timeit(lambda: engine._decode(z), 5))


def project_plain(b: Bench, root: Path, size: int, state: dict[str, Any], extras: bool = False) -> None:
    """The plain path in process: refine (and its image, for the quality check); ``extras``: the
    ensemble and the balanced memory mode instead."""
    from krita_sdxl.backend.engine.sdxl_engine import Engine

    noop = (lambda *a: None, lambda: False)
    image = make_image(size, size)
    req = make_request(image, REFINE)
    other = b.allocated()  # the stock pipelines, still on the GPU in the first call
    t = time.monotonic()
    engine = Engine.load(model=str(root / "refiner"), base_model=str(root / "base"), device=b.device,
                         speed="off", memory="none", watermark=False, cache_dir=root / "cache")  # fmt: skip
    b.record("plain.load_s", round(time.monotonic() - t, 1))
    if not extras:
        state["plain_image"] = engine.refine(req, *noop)
        b.reset_peak()
        b.record("plain.refine_s", b.timeit(lambda: engine.refine(req, *noop), 3))
        b.record("plain.refine_peak_GiB", b.peak(other))
        parts(b, engine, size, "plain")
        engine = None
        free_gpu()
        return
    ens = make_request(image, ENSEMBLE)
    try:
        engine.refine(make_request(image, dict(ENSEMBLE, steps=5)), *noop)
        b.reset_peak()
        b.record("plain.ensemble_s", b.timeit(lambda: engine.refine(ens, *noop), 2))
        b.record("plain.ensemble_peak_GiB", b.peak())
    except Exception as exc:
        b.record("plain.ensemble_error", f"{type(exc).__name__}: {exc}"[:500])
    engine = None
    free_gpu()
    if b.device != "cuda":
        b.record("plain.balanced", "skipped: needs a GPU")
        return
    t = time.monotonic()
    engine = Engine.load(model=str(root / "refiner"), device=b.device, speed="off", memory="balanced",
                         watermark=False, cache_dir=root / "cache")  # fmt: skip
    b.record("balanced.load_s", round(time.monotonic() - t, 1))
    state["balanced_image"] = engine.refine(req, *noop)
    b.reset_peak()
    b.record("balanced.refine_s", b.timeit(lambda: engine.refine(req, *noop), 3))
    b.record("balanced.refine_peak_GiB", b.peak())
    quality(b, state, "balanced_image", "balanced.quality_vs_plain")  # its VAE runs in tiles
    prompts = iter(range(100))

    def new_prompt() -> Any:
        return engine.refine(make_request(image, dict(REFINE, prompt=f"{PROMPT} {next(prompts)}")), *noop)

    b.record("balanced.refine_new_prompt_s", b.timeit(new_prompt, 3))
    b.record("balanced.refine_new_prompt_peak_GiB", b.peak())
    b.record("balanced.memory", engine.describe().get("memory"))
    engine = None
    free_gpu()


def speed_in_process(b: Bench, root: Path, size: int, state: dict[str, Any], scope: str) -> None:
    """The speed path in this process: ``regional`` (the default, on the service's warm compile cache:
    where its time goes) or ``whole`` (whole-graph, static shapes, CUDA graphs; cold: the A/B figure)."""
    from krita_sdxl.backend.engine.sdxl_engine import Engine

    options = {} if scope == "regional" else {"scope": "whole", "unet_mode": "reduce-overhead", "dynamic": False,
                                              "buckets": True}  # fmt: skip
    os.environ["KRITA_SDXL_SPEED_OPTIONS"] = json.dumps(options)
    torch._dynamo.reset()
    noop = (lambda *a: None, lambda: False)
    req = make_request(make_image(size, size), REFINE)
    cache = root / ("compile-cache" if scope == "regional" else "compile-cache-whole")
    engine = Engine.load(model=str(root / "refiner"), device=b.device, speed="on", memory="none",
                         watermark=False, cache_dir=root / "cache", compile_cache=cache)  # fmt: skip
    try:
        t = time.monotonic()
        state[f"{scope}_image"] = engine.refine(req, *noop)
        b.record(f"{scope}.first_refine_s", round(time.monotonic() - t, 1))
        b.reset_peak()
        b.record(f"{scope}.refine_s", b.timeit(lambda: engine.refine(req, *noop), 5))
        b.record(f"{scope}.refine_peak_GiB", b.peak())
        quality(b, state, f"{scope}_image", f"{scope}.quality_vs_plain")
        parts(b, engine, size, scope)
        b.record(f"{scope}.stats", engine.speed.stats() if engine.speed else None)
    finally:
        os.environ.pop("KRITA_SDXL_SPEED_OPTIONS", None)
        engine = None
        torch._dynamo.reset()
        free_gpu()


class Service:
    """``krita-sdxl serve`` in a subprocess, timed from launch; a watchdog kills it at the deadline."""

    def __init__(self, b: Bench, args: list[str], env: dict[str, str], deadline_s: float) -> None:
        from krita_sdxl.backend.cli.launcher import start_service

        self.b = b
        self.t_launch = time.monotonic()
        self.svc = start_service(args, timeout=max(deadline_s, 5.0), env=env)
        self.ready_s = time.monotonic() - self.t_launch
        self.watchdog = threading.Timer(max(deadline_s - self.ready_s, 1.0), self.svc.proc.kill)
        self.watchdog.daemon = True
        self.watchdog.start()

    def speed_stats(self, jobs: int) -> dict[str, Any] | None:
        """The service's last ``speed: {...}`` log line, once it has logged ``jobs`` of them."""
        deadline = time.monotonic() + 2.0
        while True:
            found = [ln for ln in list(self.svc.lines) if "speed: {" in ln]
            if len(found) >= jobs or time.monotonic() > deadline:
                if not found:
                    return None
                line = found[-1]
                return json.loads(line[line.index("speed: {") + len("speed: ") :])
            time.sleep(0.05)

    def stop(self, log_name: str) -> None:
        self.watchdog.cancel()
        self.svc.stop(timeout=20)
        text = self.svc.log
        (self.b.out / log_name).write_text(text[-200_000:])


def service_runs(
    b: Bench, root: Path, size: int, is_tiny: bool, state: dict[str, Any], speed_options: str | None = None
) -> None:
    from krita_sdxl.backend.cli.client import ServiceClient

    cache = root / "compile-cache"
    args = ["--model", str(root / "refiner"), "--base-model", str(root / "base"), "--device", b.device,
            "--speed", "on", "--compile-cache", str(cache), "--memory", "none", "--cache-dir", str(root / "cache"),
            "--log-level", "info", "--no-watermark"]  # fmt: skip
    env = {"KRITA_SDXL_CACHE": str(root / "cache")}
    if is_tiny:  # no compilation on the CPU smoke test: buckets and the prompt cache still run
        env["KRITA_SDXL_SPEED_OPTIONS"] = json.dumps({"unet_mode": None, "vae_mode": None})
    if speed_options:
        env["KRITA_SDXL_SPEED_OPTIONS"] = speed_options
    b.record("speed.options_env", env.get("KRITA_SDXL_SPEED_OPTIONS", "(defaults)"))
    static = not is_tiny and '"scope": "whole"' in (speed_options or "") and '"dynamic": true' not in speed_options
    image = make_image(size, size)
    jobs = 1  # the service's warm-up job logs its speed line too

    def run(client: ServiceClient, img: Any, params: dict[str, Any]) -> tuple[float, Any]:
        t = time.perf_counter()
        done = client.run(img, timeout=10.0, **params)
        return time.perf_counter() - t, done

    # --- cold: empty compile cache -------------------------------------------------------------
    svc = Service(b, args, env, deadline_s=b.left() - 50)
    b.record("cold.ready_s", round(svc.ready_s, 1))
    try:
        with ServiceClient(svc.svc.endpoint, timeout=60.0) as client:
            client.hello()
            first, done = run(client, image, REFINE)
            jobs += 1
            b.record("cold.first_result_s", round(first, 2))
            b.record("cold.launch_to_first_result_s", round(time.monotonic() - svc.t_launch, 1))
            b.record("cold.stats_after_first", svc.speed_stats(jobs))
            b.record("cold.warmup_log", [ln[-160:] for ln in list(svc.svc.lines) if "warm-up" in ln])
            warm = []
            for _ in range(5):
                s, done = run(client, image, REFINE)
                warm.append(s)
                jobs += 1
            state["speed_image"] = done.images["image"]
            b.record("speed.refine_request_s", round(statistics.median(warm), 4))
            b.record("speed.refine_request_all_s", [round(x, 4) for x in warm])
            b.record("speed.refine_worker_s", round(done["elapsed"], 4))
            fresh = []
            for i in range(3):
                s, _ = run(client, image, dict(REFINE, prompt=f"{PROMPT}, variation {i}"))
                fresh.append(s)
                jobs += 1
            b.record("speed.refine_request_new_prompt_s", round(statistics.median(fresh), 4))
            stats = svc.speed_stats(jobs)
            b.record("speed.stats_after_warm", stats)
            if stats and "peak_gpu_bytes" in stats:
                b.record("speed.refine_peak_GiB", gib(stats["peak_gpu_bytes"]))
            quality(b, state)
            # --- the sweep: 10 selection sizes ------------------------------------------------------
            before = stats or {}
            sweep = TINY_SWEEP if is_tiny else SWEEP
            rows = []
            from krita_sdxl.backend.speed.buckets import DEFAULT_POLICY

            seen = {DEFAULT_POLICY.bucket(size, size)}
            for w, h in sweep:
                new_bucket = DEFAULT_POLICY.bucket(w, h) not in seen
                if b.left() < (200 if static and new_bucket else 45):  # static shapes: a new bucket compiles
                    rows.append({"size": f"{w}x{h}", "skipped": "time"})
                    continue
                seen.add(DEFAULT_POLICY.bucket(w, h))
                s, _ = run(client, make_image(w, h, seed=w + h), REFINE)
                jobs += 1
                st = svc.speed_stats(jobs) or {}
                rows.append(
                    {"size": f"{w}x{h}", "request_s": round(s, 3), "compiled_graphs": st.get("compiled_graphs")}
                )
            after = svc.speed_stats(jobs) or {}
            b.record("sweep.rows", rows)
            b.record("sweep.shapes", after.get("buckets"))  # padded work sizes the speed path ran
            b.record("sweep.distinct_sizes", len(set(sweep)))
            if "compiled_graphs" in after and "compiled_graphs" in before:
                b.record("sweep.new_compilations", after["compiled_graphs"] - before["compiled_graphs"])
                b.record("sweep.fxgraph_cache_miss_new", after["fxgraph_cache_miss"] - before["fxgraph_cache_miss"])
            b.record("sweep.stats_after", after)
    finally:
        svc.stop("service-cold.log")
    # --- warm restart: same compile cache -------------------------------------------------------
    if b.left() < 40:
        b.record("warm.status", "skipped: time")
        return
    svc = Service(b, args, env, deadline_s=b.left() - 5)
    b.record("warm.ready_s", round(svc.ready_s, 1))
    try:
        with ServiceClient(svc.svc.endpoint, timeout=60.0) as client:
            client.hello()
            first, _ = run(client, image, REFINE)
            b.record("warm.first_result_s", round(first, 2))
            b.record("warm.launch_to_first_result_s", round(time.monotonic() - svc.t_launch, 1))
            b.record("warm.stats_after_first", svc.speed_stats(2))
            b.record("warm.warmup_log", [ln[-160:] for ln in list(svc.svc.lines) if "warm-up" in ln])
            s, _ = run(client, image, REFINE)
            b.record("warm.second_request_s", round(s, 4))
            # --- the ensemble on the speed path (the base UNet compiles here, cold) -----------------
            if b.left() < 150 and not is_tiny:
                b.record("speed.ensemble", f"skipped: time ({b.left():.0f} s left)")
                return
            first, _ = run(client, image, ENSEMBLE)
            b.record("speed.ensemble_first_s", round(first, 2))
            times = [run(client, image, ENSEMBLE)[0] for _ in range(2)]
            b.record("speed.ensemble_request_s", round(statistics.median(times), 4))
            stats = svc.speed_stats(5)
            b.record("speed.stats_after_ensemble", stats)
            if stats and "peak_gpu_bytes" in stats:
                b.record("speed.ensemble_peak_GiB", gib(stats["peak_gpu_bytes"]))
    finally:
        svc.stop("service-warm.log")


def quality(b: Bench, state: dict[str, Any], other: str = "speed_image", key: str = "quality") -> None:
    """Another path's image (the speed path's by default) against the plain path's (same request, seed)."""
    from krita_sdxl.backend.engine import pixels

    a, c = state.get("plain_image"), state.get(other)
    if a is None or c is None:
        b.record(key, "not measured: an image is missing")
        return
    x = pixels.samples(a)[..., :3].astype(np.float64)
    y = pixels.samples(c)[..., :3].astype(np.float64)
    mse = float(np.mean((x - y) ** 2))
    b.record(
        key,
        {
            "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse > 0 else "inf (identical)",
            "max_abs_diff": int(np.max(np.abs(x - y))),
            "mean_abs_diff": round(float(np.mean(np.abs(x - y))), 3),
            "share_identical": round(float(np.mean(x == y)), 4),
            "plain_std": round(float(x.std()), 2),  # a flat or saturated image would make the check meaningless
            "share_saturated": round(float(np.mean((x == 0) | (x == 255))), 4),
        },
    )


def vae_channels_last(b: Bench, size: int) -> None:
    """The VAE decoder compiled (static shape), NCHW vs channels_last, bf16."""
    from diffusers import AutoencoderKL

    with torch.device(b.device):
        vae = AutoencoderKL(**VAE).to(torch.bfloat16).eval()
    z = torch.randn(1, 4, size // 8, size // 8, device=b.device, dtype=torch.bfloat16)
    with torch.inference_mode():
        b.record("vae.decode_eager_s", b.timeit(lambda: vae.decode(z), 5))
        for layout in ("nchw", "channels_last"):
            if b.left() < 45:
                b.record(f"vae.decode_compiled_{layout}", "skipped: time")
                continue
            torch._dynamo.reset()
            if layout == "channels_last":
                vae.to(memory_format=torch.channels_last)
            dec = torch.compile(vae.decoder, fullgraph=True)
            zz = z.to(memory_format=torch.channels_last) if layout == "channels_last" else z
            t = time.monotonic()
            dec(vae.post_quant_conv(zz))
            b.sync()
            b.record(f"vae.compile_{layout}_s", round(time.monotonic() - t, 1))
            b.record(f"vae.decode_compiled_{layout}_s", b.timeit(lambda: dec(vae.post_quant_conv(zz)), 5))  # noqa: B023


# --- report ---------------------------------------------------------------------------------------------


def table(r: dict[str, Any]) -> str:
    def f(key: str, unit: str = "s") -> str:
        v = r.get(key)
        if v is None:
            return "not measured"
        if isinstance(v, int | float):
            return f"{v:.3f} {unit}" if unit == "s" and v < 10 else f"{v} {unit}"
        return str(v)

    card = r.get("device", "?")
    lines = [
        f"SDXL refiner/base, random weights in the real architectures, 1024x1024 — {card}, {r.get('date')}",
        "",
        "| what | stock diffusers (eager) | this project, plain (--speed off) | this project, speed path | goal |",
        "|---|---|---|---|---|",
        f"| refine 50 x 0.3, engine call | {f('stock.refine_s')} | {f('plain.refine_s')} | "
        f"{f('speed.refine_worker_s')} (worker) | |",
        f"| refine, request-to-result over ZeroMQ, warm | | | {f('speed.refine_request_s')} | <= 0.55 s |",
        f"| refine, request-to-result, new prompt each time | | | {f('speed.refine_request_new_prompt_s')} | |",
        f"| refine, peak GPU memory | {f('stock.refine_peak_GiB', 'GiB')} | {f('plain.refine_peak_GiB', 'GiB')} | "
        f"{f('speed.refine_peak_GiB', 'GiB')} (incl. CUDA-graph pool) | |",
        f"| ensemble 40 steps split 0.8 (32 base + 8 refiner calls) | {f('stock.ensemble_s')} | "
        f"{f('plain.ensemble_s')} | {f('speed.ensemble_request_s')} (request) | <= 1.5 s |",
        f"| ensemble, peak GPU memory | {f('stock.ensemble_peak_GiB', 'GiB')} | {f('plain.ensemble_peak_GiB', 'GiB')}"
        f" | {f('speed.ensemble_peak_GiB', 'GiB')} | |",
        f"| balanced memory mode: refine time | (FACTS: model offload {FACTS_H100['stock_model_offload_s']} s) | "
        f"{f('balanced.refine_s')} | | <= 1.3 x plain |",
        f"| balanced memory mode: peak GPU memory | (FACTS: {FACTS_H100['stock_model_offload_peak_GiB']} GiB) | "
        f"{f('balanced.refine_peak_GiB', 'GiB')} | | <= 6 GiB |",
        f"| compile, cold: first request (launch to first result) | (FACTS: {FACTS_H100['stock_compile_first_call_s']}"
        f" s first call) | | {f('cold.first_result_s')} ({f('cold.launch_to_first_result_s')}) | |",
        f"| compile, warm cache: restart to first result | | | {f('warm.launch_to_first_result_s')} "
        f"(first request {f('warm.first_result_s')}) | <= 20 s |",
        f"| compilations over a sweep of 10 selection sizes | | | {f('sweep.new_compilations', '')} new "
        f"({len(r.get('sweep.shapes') or [])} padded shapes) | few |",
        f"| quality: speed vs plain image, same seed | | | {r.get('quality')} | |",
        "",
        f"stock diffusers with torch.compile (FACTS, not re-measured): {FACTS_H100['stock_refine_compiled_s']} s.",
    ]
    if "balanced.refine_s" in r and "plain.refine_s" in r:
        lines.append(f"balanced / plain time ratio: {r['balanced.refine_s'] / r['plain.refine_s']:.2f}")
    for key in ("vae.decode_eager_s", "vae.decode_compiled_nchw_s", "vae.decode_compiled_channels_last_s"):
        if key in r:
            lines.append(f"{key}: {r[key]}")
    return "\n".join(lines) + "\n"


def live_stage(b: Bench, root: Path, is_tiny: bool) -> None:
    """Live refine (issue 22): stroke-to-preview latency at 512, 768 and 1024 px for each speed level
    (tests/benchmarks/bench_live.py: gpu_live)."""
    from bench_live import LEVELS, PLUGIN_MS, SIZES, gpu_live

    args = ("--device", b.device, "--memory", "none", "--cache-dir", str(root / "cache"), "--no-watermark",
            "--compile-cache", str(root / "compile-cache"))  # fmt: skip
    result = gpu_live(str(root / "refiner"), str(root / "base"), ("off",) if is_tiny else LEVELS,
                      (64, 128) if is_tiny else SIZES, plugin_ms=PLUGIN_MS, deadline_s=b.left() - 30,
                      extra_args=args, env={"KRITA_SDXL_CACHE": str(root / "cache")})  # fmt: skip
    b.record("live", result)


def card_slug(name: str) -> str:
    for token in ("H200", "H100", "A100", "L40S", "L4", "A10G", "4090", "3090"):
        if token in name.upper():
            return token.lower()
    return "".join(ch for ch in name.lower() if ch.isalnum())[:16] or "gpu"


def save_tables(args: Any, results: dict, text: str, device: str, kind: str) -> None:
    """table.md in ``args.out``; with ``args.results_dir``, DATE-CARD-KIND.json and .md there too."""
    (args.out / "table.md").write_text(text)
    print("\n" + text, flush=True)
    if args.results_dir:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{date.today()}-{card_slug(results['device']) if device == 'cuda' else 'cpu-tiny'}-{kind}"
        (args.results_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
        (args.results_dir / f"{stem}.md").write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test of this script)")
    ap.add_argument("--budget", type=float, help="seconds; stages that would not fit are skipped (500; tiny: 1500)")
    ap.add_argument("--results-dir", type=Path, help="also write <date>-<card>-gpu.json/.md here")
    ap.add_argument("--speed-options", help='KRITA_SDXL_SPEED_OPTIONS for the service, e.g. {"dynamic": true}')
    ap.add_argument("--vae-ab", action="store_true", help="stage 7 (VAE decoder NCHW vs channels_last) if time is left")
    ap.add_argument("--upscale-levels", help="last stage, if time is left: 1024 -> 2048 upscale-refine per speed "
                    "level, e.g. off,compile (bench_upscale.py)")  # fmt: skip
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.budget is None:
        args.budget = 1500.0 if args.tiny else 500.0
    if args.tiny:  # tiny tensors: one thread avoids OpenMP spinning on a busy machine
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    size = 128 if args.tiny else 1024
    b = Bench(args.out, args.budget, device)
    import diffusers
    import transformers

    b.record("device", torch.cuda.get_device_name() if device == "cuda" else "cpu (tiny smoke test)")
    b.record("date", str(date.today()))
    b.record("versions", {"torch": torch.__version__, "diffusers": diffusers.__version__,
                          "transformers": transformers.__version__, "python": sys.version.split()[0]})  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    state: dict[str, Any] = {}
    pipes: dict[str, Any] = {}

    def build() -> None:
        pipes.update(build_and_save(b, root, args.tiny, dtype))

    # The speed path first (the goal), then what the time left allows.
    if b.stage("build", 0, build):
        b.stage("stock", 30, lambda: stock(b, pipes, size))
    b.stage("plain", 30, lambda: project_plain(b, root, size, state))
    need = 150 if not args.tiny else 0
    b.stage("service", need, lambda: service_runs(b, root, size, args.tiny, state, args.speed_options))
    b.stage("live", 200 if not args.tiny else 0, lambda: live_stage(b, root, args.tiny))
    if pipes:
        b.stage("stock_ensemble", 25, lambda: stock(b, pipes, size, ensemble_only=True))
    pipes.clear()
    free_gpu()
    b.stage("plain_extras", 45, lambda: project_plain(b, root, size, state, extras=True))
    b.stage("regional", 40 if not args.tiny else 0, lambda: speed_in_process(b, root, size, state, "regional"))
    if not args.tiny:  # a cold whole-graph compilation: minutes
        b.stage("whole", 200, lambda: speed_in_process(b, root, size, state, "whole"))
    if args.vae_ab and device == "cuda":
        b.stage("vae_ab", 60, lambda: vae_channels_last(b, size))
    if args.upscale_levels:
        from bench_upscale import upscale_levels

        levels = tuple(v.strip() for v in args.upscale_levels.split(",") if v.strip())
        b.stage("upscale", 60, lambda: upscale_levels(b, root, size, levels, tile=size))
    b.record("total_s", round(time.monotonic() - b.t0, 1))
    save_tables(args, b.results, table(b.results), device, "gpu")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
