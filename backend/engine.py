"""The refiner engine: one loaded SDXL img2img pipeline and the job flow around it.

The VAE runs here, not inside the pipeline, so that it runs in its own dtype (bf16 on CUDA where
supported: the stock SDXL VAE overflows in fp16) and only once per direction. The pipeline gets
latents as its ``image`` and returns latents. Not thread-safe: one job at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from krita_sdxl.protocol import Image

from . import pixels
from .models import DEFAULT_REFINER, load_refiner, pick_device, pick_dtypes, resolve_refiner
from .preview import latents_to_preview
from .request import JobCancelled, ProgressFn, RefineRequest, StopFn

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from .speed import SpeedPath

log = logging.getLogger(__name__)

LATENT_MULTIPLE = 8  # the VAE's scale factor: work images are padded to a multiple of it


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
    ) -> None:
        self.speed = speed  # the compiled speed path (backend/speed.py), None = plain eager path
        self._preview_hw: tuple[int, int] | None = None  # latent rows/cols of the work image (no padding)
        self.pipe = pipe
        self.device = device
        self.unet_dtype = unet_dtype
        self.vae_dtype = vae_dtype
        self.name = name
        self.path = path

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
    ) -> Engine:
        """Pick device and dtypes, find the refiner (raises ModelNotFound) and load it."""
        chosen = pick_device(device)
        unet_dtype, vae_dtype = pick_dtypes(chosen, dtype)
        path = resolve_refiner(model, demo=demo, allow_download=allow_download, cache_dir=cache_dir)
        pipe = load_refiner(path, chosen, unet_dtype, vae_dtype)
        name = "demo-v1 (tiny random weights)" if demo else (model or DEFAULT_REFINER)
        from .demo_model import default_cache_dir
        from .speed import default_compile_cache, setup

        cache = compile_cache or default_compile_cache(cache_dir or default_cache_dir())
        fast = setup(pipe, chosen, speed, cache)
        return cls(pipe, chosen, unet_dtype, vae_dtype, name=name, path=path, speed=fast)

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
            "models": [{"role": "refiner", "name": self.name, "path": str(self.path) if self.path else None}],
            "modes": ["refine"],
            "speed": self.speed.describe() if self.speed is not None else {"enabled": False},
        }

    # --- the job --------------------------------------------------------------------------------

    def refine(self, req: RefineRequest, on_progress: ProgressFn, should_stop: StopFn) -> Image:
        """Run one refine job; returns an image of the input's exact size and format.

        Calls ``on_progress(step, req.plan.denoise_steps, preview)`` after every denoising step and
        raises :class:`JobCancelled` at the first step boundary where ``should_stop()`` is true.
        """
        spec = req.image.spec
        mask = pixels.mask_to_float(req.mask) if req.mask is not None else None
        if mask is not None and mask.shape != (spec.height, spec.width):
            raise ValueError(
                f"mask is {mask.shape[1]}x{mask.shape[0]}, the image is {spec.width}x{spec.height}; they must match"
            )
        if should_stop():
            raise JobCancelled()
        # --- large layers (backend/tiling.py): above self.tiling's threshold (a TilingConfig; unset
        # = defaults), refine at native size in overlapping, blended tiles, each through this method.
        from .tiling import refine_if_large

        if (tiled := refine_if_large(self, req, on_progress, should_stop)) is not None:
            return tiled
        # --- end of the tiling hook
        rgb, _ = pixels.to_rgb_alpha(req.image)
        if req.transfer == "linear":
            rgb = pixels.linear_to_srgb(rgb)
        work = req.work_size if req.work_size and req.work_size != (spec.width, spec.height) else None
        if work is not None:
            rgb = pixels.resize(rgb, work)
        if self.speed is not None:  # size buckets: few shapes, so few compilations and CUDA graphs
            padded, (h, w) = self.speed.pad(rgb)
        else:
            padded, (h, w) = pixels.pad_to_multiple(rgb, LATENT_MULTIPLE)
        self._preview_hw = (-(-h // LATENT_MULTIPLE), -(-w // LATENT_MULTIPLE))
        with torch.inference_mode():
            latents = self._encode(padded)
            latents = self._denoise(latents, req, on_progress, should_stop)
            out = self._decode(latents)[:h, :w]
        if self.speed is not None:
            self.speed.after_job()
        if work is not None:
            out = pixels.resize(out, (spec.width, spec.height))
        if req.transfer == "linear":
            out = pixels.srgb_to_linear(out)
        if mask is not None and req.feather > 0:
            mask = pixels.feather_inward(mask, req.feather)
        return Image(spec, pixels.merge_result(out, req.image, mask))

    def _denoise(
        self, latents: torch.Tensor, req: RefineRequest, on_progress: ProgressFn, should_stop: StopFn
    ) -> torch.Tensor:
        total = req.plan.denoise_steps
        steps_run = 0

        def step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal steps_run
            steps_run = i + 1
            crop = self._preview_hw or kwargs["latents"].shape[-2:]
            preview = latents_to_preview(kwargs["latents"][..., : crop[0], : crop[1]]) if req.preview else None
            on_progress(steps_run, total, preview)
            if should_stop():
                raise JobCancelled()
            return {}

        result = self.pipe(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            image=latents.to(self.unet_dtype),
            strength=req.strength,
            num_inference_steps=req.plan.steps,
            guidance_scale=req.guidance_scale,
            aesthetic_score=req.aesthetic_score,
            negative_aesthetic_score=req.negative_aesthetic_score,
            generator=torch.Generator("cpu").manual_seed(req.seed),
            output_type="latent",
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        if steps_run != total:
            log.warning("the pipeline ran %d denoising steps, the step plan said %d", steps_run, total)
        return result.images

    def _encode(self, rgb: np.ndarray) -> torch.Tensor:
        """HxWx3 float [0, 1] -> scaled latents (1, 4, H/8, W/8), VAE in its own dtype."""
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1).unsqueeze(0)
        x = x * 2.0 - 1.0
        latents = self._run_vae(lambda vae, dtype: vae.encode(x.to(dtype)).latent_dist.mode(), "encode")
        return latents * self.pipe.vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents -> HxWx3 float32 [0, 1] numpy array."""
        z = latents / self.pipe.vae.config.scaling_factor
        image = self._run_vae(lambda vae, dtype: vae.decode(z.to(dtype)).sample, "decode")
        image = ((image[0].float().clamp(-1.0, 1.0) + 1.0) * 0.5).permute(1, 2, 0)
        return image.cpu().numpy()

    def _run_vae(self, fn: Any, what: str) -> torch.Tensor:
        """Run ``fn(vae, dtype)`` in the VAE's dtype; if that gives non-finite values, again in fp32."""
        vae = self.pipe.vae
        out = fn(vae, self.vae_dtype)
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
