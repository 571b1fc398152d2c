"""The engine: the loaded SDXL pipelines (refiner, and the base when a mode needs it) and the job flow.

The VAE runs here, not inside the pipeline, so that it runs in its own dtype (bf16 on CUDA where
supported: the stock SDXL VAE overflows in fp16) and only once per direction. The pipeline gets
latents as its ``image`` and returns latents. One job at a time; ``unload`` may be called from
another thread (it waits for the running job to end when there is one).

Modes, masks, memory modes, model sources and the out-of-memory policy live in their own modules
(stages, denoise, latent_mask, memory, sources, model_set, oom, watermark), and so does the colour
path in and out of the model (work_image: transparent areas, float values above 1, work size,
watermark); this class wires them up. Seeds follow stock diffusers: one CPU generator per job, the
source's VAE latent sampled from it first (img2img from the source), then the pipelines' noise.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from krita_sdxl.backend.models import oom
from krita_sdxl.backend.models.memory import Placement, lower_mode
from krita_sdxl.backend.models.model_set import ModelSet
from krita_sdxl.backend.models.refiner import pick_device, pick_dtypes
from krita_sdxl.backend.speed import prompt_cache
from krita_sdxl.protocol import Image

from . import pixels, work_image
from .denoise import StepReporter, default_stages, job_generator, run_stages
from .latent_mask import LatentMask, fit_mask
from .request import JobCancelled, ProgressFn, RefineRequest, StopFn
from .stages import BASE_MODES, MODES, Schedule, Stages, scheduler_timesteps
from .upscale import capability as upscale_capability
from .watermark import Watermark

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from krita_sdxl.backend.speed.speed_path import SpeedPath

log = logging.getLogger(__name__)

LATENT_MULTIPLE = 8  # the VAE's scale factor: work images are padded to a multiple of it


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _placement(memory: str, device: str, refiner: Any, base: Any, unet_dtype: torch.dtype) -> Placement:
    """The memory placement for ``--memory`` (auto: chosen from the free GPU memory and the models' sizes)."""
    if memory != "auto":
        return Placement(memory, device)
    from krita_sdxl.backend.models.footprint import source_footprint
    from krita_sdxl.backend.models.memory import choose_auto

    free = torch.cuda.mem_get_info(torch.device(device))[0] if device.startswith("cuda") else None
    size = torch.finfo(unet_dtype).bits // 8
    models = [source_footprint(refiner, size)] + ([source_footprint(base, size, shared=True)] if base else [])
    mode, reason = choose_auto(device, free, models)
    log.info("memory mode auto: %s (%s)", mode, reason)
    return Placement(mode, device, requested="auto", reason=reason)


WARMUP_SIZE = 1024  # px: the warm-up's square, SDXL's native size


class Engine:
    def __init__(
        self,
        pipe: StableDiffusionXLImg2ImgPipeline,
        device: str,
        unet_dtype: torch.dtype,
        vae_dtype: torch.dtype,
        name: str = "refiner",
        path: Path | None = None,
        speed: SpeedPath | None = None,
        models: ModelSet | None = None,
        watermark: Watermark | None = None,
        oom_retry: bool = False,
    ) -> None:
        self.speed = speed  # the compiled speed path (backend/speed/speed_path.py), None = plain eager path
        self._preview_hw: tuple[int, int] | None = None  # latent rows/cols of the work image (no padding)
        self.device = device
        self.unet_dtype = unet_dtype
        self.vae_dtype = vae_dtype
        self.name = name
        self.path = path
        # The models (refiner, lazily the base) and their memory placement: backend/models/model_set.py.
        self.models = models or ModelSet(Placement("none", device), unet_dtype, vae_dtype, refiner_pipe=pipe)
        self.watermark = watermark or Watermark(enabled=False)
        self.oom_retry = oom_retry  # out of memory: step down one memory mode and run the job once more
        self.upscaler: Any = None  # --upscaler: the model upscale jobs enlarge with (backend/engine/upscaler_model.py)
        self.simulated_oom: oom.SimulatedOom | None = None  # --simulate-oom (tests)
        self._speed_setup: Any = None  # re-applies the speed path to a reloaded refiner
        self._busy = threading.RLock()  # held while a job runs
        self._depth = 0  # refine() calls in progress (tiles call it again from inside)
        self._pending_unload: set[str] = set()
        self._pending_lock = threading.Lock()
        self._schedule: tuple[str, Schedule] | None = None

    @property
    def timesteps(self) -> Schedule:
        """The step arithmetic of the refiner's and the base's schedulers (:mod:`.stages`): a loaded model's
        own scheduler, a model not loaded (yet) by its folder's config; nothing is loaded for it."""
        configs = [self._scheduler_config(role) for role in ("refiner", "base")]
        key = json.dumps(configs, sort_keys=True, default=str)
        if self._schedule is None or self._schedule[0] != key:
            self._schedule = key, scheduler_timesteps(configs[0], configs[1])
        return self._schedule[1]

    def _scheduler_config(self, role: str) -> dict[str, Any] | None:
        pipe = self.models.if_loaded(role)
        if pipe is not None:
            return {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
        source = self.models.sources.get(role)
        return source.scheduler_config() if source is not None else None

    @property
    def pipe(self) -> StableDiffusionXLImg2ImgPipeline:
        """The refiner pipeline (loaded again first if it was unloaded)."""
        return self.models.refiner

    @pipe.setter
    def pipe(self, value: StableDiffusionXLImg2ImgPipeline) -> None:
        self.models.set_refiner(value)

    @classmethod
    def load(
        cls,
        model: str | None = None,
        demo: bool = False,
        allow_download: bool = False,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: Path | None = None,
        speed: str = "auto",
        compile_cache: Path | None = None,
        base_model: str | None = None,
        model_config: str | None = None,
        base_model_config: str | None = None,
        memory: str = "none",
        watermark: bool = True,
        oom_retry: bool = False,
        simulate_oom: int = 0,
    ) -> Engine:
        """Pick device and dtypes, find the refiner (raises ModelNotFound) and the base (if any: it
        loads with the first job that needs it), choose the memory mode (raises MemoryModeError)
        and load the refiner."""
        from krita_sdxl.backend.models.demo import default_cache_dir
        from krita_sdxl.backend.models.memory import check_mode
        from krita_sdxl.backend.models.sources import resolve_base, resolve_source
        from krita_sdxl.backend.speed.setup import setup
        from krita_sdxl.backend.speed.speed_path import default_compile_cache

        chosen = pick_device(device)
        unet_dtype, vae_dtype = pick_dtypes(chosen, dtype)
        check_mode(memory, chosen)
        refiner = resolve_source(
            "refiner", model, demo=demo, allow_download=allow_download, cache_dir=cache_dir, config=model_config
        )
        base = resolve_base(
            base_model, demo=demo, allow_download=allow_download, cache_dir=cache_dir, config=base_model_config
        )
        placement = _placement(memory, chosen, refiner, base, unet_dtype)
        models = ModelSet(placement, unet_dtype, vae_dtype, refiner=refiner, base=base)
        pipe = models.refiner
        prompt_cache.install(pipe)
        cache = compile_cache or default_compile_cache(cache_dir or default_cache_dir())

        offloaded = placement.mode in ("model", "sequential")

        def speed_setup(p: Any) -> Any:
            return setup(p, chosen, speed, cache, source=refiner, offloaded=offloaded)

        engine = cls(
            pipe,
            chosen,
            unet_dtype,
            vae_dtype,
            name=refiner.name,
            path=refiner.path,
            speed=speed_setup(pipe),
            models=models,
            watermark=Watermark(enabled=watermark),
            oom_retry=oom_retry,
        )
        engine._speed_setup = speed_setup
        if simulate_oom > 0:
            engine.simulated_oom = oom.SimulatedOom(simulate_oom)
            engine.simulated_oom.attach(pipe.unet)
        models.on_load = engine._on_model_loaded
        return engine

    def _on_model_loaded(self, role: str, pipe: Any) -> None:
        """A model was loaded during a job (the base the first time, or one that was unloaded)."""
        if self.simulated_oom is not None:
            self.simulated_oom.attach(pipe.unet)
        prompt_cache.install(pipe)
        if role == "refiner" and self._speed_setup is not None:
            self.speed = self._speed_setup(pipe)
        elif self.speed is not None:  # the base: its UNet is compiled too (backend/speed/speed_path.py)
            self.speed.add_pipe(pipe, role)

    def describe(self) -> dict[str, Any]:
        import diffusers

        gpu = total = free = None
        if self.device.startswith("cuda"):
            index = torch.device(self.device).index
            index = torch.cuda.current_device() if index is None else index
            gpu = torch.cuda.get_device_name(index)
            free, total = torch.cuda.mem_get_info(index)
        return {
            "device": self.device,
            "dtype": _dtype_name(self.unet_dtype),
            "vae_dtype": _dtype_name(self.vae_dtype),
            "gpu": gpu,
            "gpu_memory_total": total,
            "gpu_memory_free": free,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "models": self.models.describe(),
            "modes": [m for m in MODES if m not in BASE_MODES or self.models.available("base")],
            "speed": self.speed.describe() if self.speed is not None else {"enabled": False},
            "memory": self.models.placement.describe(),
            "oom_retry": self.oom_retry,
            "watermark": self.watermark.status,
            "tiling": self._tiling_capability(),
            "upscale": upscale_capability(self),
        }

    def _tiling_capability(self) -> dict[str, int] | None:
        """Large images are refined at native size in tiles above ``threshold`` pixels (None: never)."""
        from .tiling import TilingConfig

        cfg = getattr(self, "tiling", None) or TilingConfig()
        return {"threshold": cfg.threshold, "tile": cfg.tile, "overlap": cfg.overlap} if cfg.threshold else None

    def live_capabilities(self) -> dict[str, Any]:
        """What changes while the service runs (sent with every ``welcome``)."""
        return {"models": self.models.describe(), "memory": self.models.placement.describe()}

    def unload(self, role: str) -> tuple[bool, bool]:
        """Free the ``role`` model: (it was loaded, freeing waits for the running job to end).
        Safe to call from another thread than the one running jobs."""
        if self._busy.acquire(blocking=False):
            try:
                return self._unload_now(role), False
            finally:
                self._busy.release()
        with self._pending_lock:
            self._pending_unload.add(role)
        return self.models.loaded(role), True

    def _unload_pending(self) -> None:
        with self._pending_lock:
            roles, self._pending_unload = self._pending_unload, set()
        for role in sorted(roles):
            self._unload_now(role)

    def _unload_now(self, role: str) -> bool:
        if role == "refiner":
            if self.speed is not None:
                self.speed.close()  # TensorRT engines and their thread
            self.speed = None  # it holds the pipeline
        elif self.speed is not None and self.models.loaded(role):
            self.speed.forget(self.models.get(role))  # else its compiled UNet would stay referenced
        return self.models.unload(role)

    def warm_up(self, size: int = WARMUP_SIZE, should_stop: StopFn = lambda: False) -> float | None:
        """Compile the speed path before the first job: one refine of a ``size`` px grey square with a
        single denoising step. Returns its seconds, or None when there is nothing to compile. With
        the default regional compilation every size runs on the graphs this compiles; ``size`` also
        gives inductor its size hints, so it is the typical work size. A failure is logged, not
        raised: the first job then compiles, or runs eagerly."""
        if self.speed is None or not self.speed.needs_warmup:
            return None
        from krita_sdxl.protocol import ImageSpec

        from .stages import plan_job

        t = time.monotonic()
        grey = Image(ImageSpec(size, size, "RGB", 8), bytes([128]) * (size * size * 3))
        plan, stages = plan_job("refine", 1, 1.0, timesteps=self.timesteps)
        req = RefineRequest(image=grey, prompt="", negative_prompt="", strength=1.0, plan=plan, seed=0,
                            guidance_scale=5.0, aesthetic_score=6.0, negative_aesthetic_score=2.5,
                            stages=stages)  # fmt: skip
        log.info("speed path: compiling (warm-up at %dx%d; the compile cache makes later starts quicker)", size, size)
        try:
            self.refine(req, lambda *a: None, should_stop)
        except JobCancelled:
            return None
        except Exception:
            log.exception("speed path: the warm-up failed; the first job compiles instead")
            return None
        seconds = time.monotonic() - t
        log.info("speed path: warm-up done in %.1f s (%s)", seconds, self.speed.stats() if self.speed else "off")
        return seconds

    # --- the job --------------------------------------------------------------------------------

    def refine(self, req: RefineRequest, on_progress: ProgressFn, should_stop: StopFn) -> Image:
        """Run one job (any mode); returns an image of the input's exact size and format.

        Calls ``on_progress(step, req.plan.denoise_steps, preview)`` after every denoising step and
        raises :class:`JobCancelled` at the first step boundary where ``should_stop()`` is true.
        Out of memory raises :class:`.oom.OutOfMemoryError` (after one retry with ``oom_retry``).
        """
        with self._busy:
            self._depth += 1
            try:
                if self._depth > 1:  # a tile of this job
                    return self._refine(req, on_progress, should_stop)
                return oom.run_with_retry(
                    lambda: self._refine(req, on_progress, should_stop), self.oom_retry, self._step_down, self._explain
                )
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.models.placement.job_done()
                    self._unload_pending()

    def _explain(self, exc: BaseException) -> str:
        mode = self.models.placement.mode
        return oom.advice(exc, mode, lower_mode(mode) if self.device.startswith("cuda") else None)

    def _step_down(self) -> str | None:
        """Out of memory with --oom-retry: the next lower memory mode (on a GPU), for this job and later ones."""
        placement = self.models.placement
        lower = lower_mode(placement.mode) if self.device.startswith("cuda") else None
        if lower is None:
            return None
        if lower in ("model", "sequential") and self.speed is not None:
            self.speed.close()
            self.speed = None  # compiled graphs cannot follow weights that move between calls
        placement.switch(lower, self.models.pipes(), reason=f"stepped down from {placement.mode} after out of memory")
        return lower

    def _refine(self, req: RefineRequest, on_progress: ProgressFn, should_stop: StopFn) -> Image:
        """One job, whole (or one tile of it). The colour path in and out: backend/engine/work_image.py."""
        mask = pixels.image_mask(req.image, req.mask)
        if should_stop():
            raise JobCancelled()
        # --- upscale jobs (backend/engine/upscale.py): enlarged, then refined in tiles in place
        from .upscale import upscale_if_asked

        if (upscaled := upscale_if_asked(self, req, on_progress, should_stop)) is not None:
            return upscaled
        # --- large layers (backend/engine/tiling.py): above self.tiling's threshold (a TilingConfig; unset
        # = defaults), refine at native size in overlapping, blended tiles, each through this method.
        from .tiling import refine_if_large

        if (tiled := refine_if_large(self, req, on_progress, should_stop)) is not None:
            return tiled
        # --- end of the tiling hook
        job = work_image.prepare(req, mask)
        if self.speed is not None:  # size buckets: few shapes, so few compilations and CUDA graphs
            padded, (h, w) = self.speed.pad(job.rgb)
        else:
            padded, (h, w) = pixels.pad_to_multiple(job.rgb, LATENT_MULTIPLE)
        self._preview_hw = (-(-h // LATENT_MULTIPLE), -(-w // LATENT_MULTIPLE))
        run_mask = job.run_mask
        keep = fit_mask(run_mask, *padded.shape[:2]) if run_mask is not None and req.keep_unmasked else None
        stages = req.stages or default_stages(req)
        generator = job_generator(req.seed)  # stock's draw order: the VAE sample first, then the noise
        with torch.inference_mode():
            latents = self._encode(padded, generator if stages.from_source else None)
            latents = self._denoise(latents, req, on_progress, should_stop, keep, stages, generator)
            out = self._decode(latents)[:h, :w]
        if self.speed is not None:
            self.speed.after_job()
        # a tile is marked once, after blending, by the tiling path
        return work_image.finish(job, out, self.watermark if self._depth <= 1 else None)

    def _denoise(
        self,
        latents: torch.Tensor,
        req: RefineRequest,
        on_progress: ProgressFn,
        should_stop: StopFn,
        keep: np.ndarray | None = None,
        stages: Stages | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Run the job's stages (backend/engine/stages.py, backend/engine/denoise.py) on the source latents.
        ``keep``: the mask at the latents' pixel size; outside it the source latents are held."""
        reporter = StepReporter(
            req.plan.denoise_steps,
            on_progress,
            should_stop,
            preview=req.preview,
            crop=self._preview_hw,
            mask=LatentMask(latents, keep) if keep is not None else None,
            on_step=self.models.placement.release,
        )
        stages = stages or req.stages or default_stages(req)
        return run_stages(self.models, stages, latents, req, reporter, self.unet_dtype, generator)

    @property
    def vae(self) -> Any:
        """The VAE (shared by refiner and base): from whichever model is loaded, the refiner if neither."""
        for role in ("refiner", "base"):
            if self.models.loaded(role):
                return self.models.get(role).vae
        return self.pipe.vae

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE's ``latents_mean`` and ``latents_std`` (1, C, 1, 1), when its config sets both."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None
        return tuple(torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype) for v in (mean, std))  # type: ignore[return-value]

    def _encode(self, rgb: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """HxWx3 float [0, 1] -> scaled latents (1, 4, H/8, W/8) in float32, VAE in its own dtype.

        With ``generator`` the latent is *sampled* from the VAE's distribution with it, as stock
        img2img does (``retrieve_latents(..., sample_mode="sample")``, in float32 as stock's
        upcast VAE); without, its mean. Then normalised as stock: ``(z - latents_mean) *
        scaling_factor / latents_std`` when the VAE's config has them, else ``z * scaling_factor``."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1).unsqueeze(0)
        x = x * 2.0 - 1.0
        moments = self._run_vae(lambda vae, dtype: vae.encode(x.to(dtype)).latent_dist.parameters, "encode")
        dist = DiagonalGaussianDistribution(moments.float())
        z = dist.sample(generator) if generator is not None else dist.mode()
        factor = self.vae.config.scaling_factor
        stats = self._latent_stats(z)
        return (z - stats[0]) * factor / stats[1] if stats is not None else z * factor

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents -> HxWx3 float32 numpy array on the [0, 1] scale (stock's denormalisation), not yet
        clamped: the watermark marks the decoded picture before the clamp, as stock does (work_image.finish)."""
        factor = self.vae.config.scaling_factor
        stats = self._latent_stats(latents)
        z = latents * stats[1] / factor + stats[0] if stats is not None else latents / factor
        image = self._run_vae(lambda vae, dtype: vae.decode(z.to(dtype)).sample, "decode")
        image = ((image[0].float() + 1.0) * 0.5).permute(1, 2, 0)
        return image.cpu().numpy()

    def _run_vae(self, fn: Any, what: str) -> torch.Tensor:
        """Run ``fn(vae, dtype)`` in the VAE's dtype; if that gives non-finite values, again in fp32."""
        vae = self.vae
        out = fn(vae, self.vae_dtype)
        self.models.placement.release()  # balanced: the VAE leaves the GPU again
        if torch.isfinite(out).all():
            return out
        if self.vae_dtype == torch.float32:
            raise RuntimeError(f"VAE {what} produced non-finite values (NaN or inf) in float32")
        log.warning("VAE %s in %s produced non-finite values; running it again in float32", what, self.vae_dtype)
        vae.to(torch.float32)
        try:
            out = fn(vae, torch.float32)
        finally:
            vae.to(self.vae_dtype)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"VAE {what} produced non-finite values (NaN or inf) even in float32")
        return out
