"""Loading the SDXL pipelines from a :class:`~.sources.ModelSource`, sharing what base and refiner share.

The base and the refiner of SDXL 1.0 use the same VAE and the same second text encoder (OpenCLIP
bigG) with its tokenizer. Whichever of the two loads second reuses the first one's objects instead
of loading its own copy, after checking that its configs for them are the same (a model whose VAE or
text encoder differs loads its own). Pipelines come back on the CPU; the memory mode places them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .refiner import weight_variants
from .sources import ModelSource

log = logging.getLogger(__name__)

SHARED = ("vae", "text_encoder_2", "tokenizer_2")


def _pipeline_class(role: str) -> Any:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLImg2ImgPipeline if role == "refiner" else StableDiffusionXLPipeline


def _config_root(source: ModelSource) -> Path:
    return source.config if source.kind == "single_file" and source.config is not None else source.path


def _component_config(source: ModelSource, name: str) -> dict[str, Any] | None:
    root = _config_root(source)
    path = root / name / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _same_config(mine: dict[str, Any] | None, theirs: Any) -> bool:
    if mine is None or theirs is None:
        return False
    theirs = theirs.to_dict() if hasattr(theirs, "to_dict") else dict(theirs)
    ignore = {"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "use_cache"}

    def clean(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if not k.startswith("_") and k not in ignore}

    a, b = clean(mine), clean(theirs)
    return all(b.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in a.items() if k in b)


def shareable(source: ModelSource, other: Any | None) -> dict[str, Any]:
    """The components of the loaded pipeline ``other`` that ``source`` can use instead of its own."""
    if other is None:
        return {}
    shared: dict[str, Any] = {}
    if _same_config(_component_config(source, "vae"), getattr(other.vae, "config", None)):
        shared["vae"] = other.vae
    if _same_config(_component_config(source, "text_encoder_2"), getattr(other.text_encoder_2, "config", None)):
        shared["text_encoder_2"] = other.text_encoder_2
        shared["tokenizer_2"] = other.tokenizer_2
    missing = [n for n in SHARED if n not in shared]
    if missing:
        log.warning("the %s loads its own %s: its configs differ from the loaded model's", source.role, missing)
    return shared


def load_pipeline(
    source: ModelSource,
    unet_dtype: torch.dtype,
    vae_dtype: torch.dtype,
    shared: dict[str, Any] | None = None,
) -> Any:
    """Load ``source`` on the CPU: UNet and text encoders in ``unet_dtype``, its own VAE in ``vae_dtype``."""
    cls = _pipeline_class(source.role)
    shared = dict(shared or {})
    log.info("loading the %s from %s (%s)%s", source.role, source.path, source.kind, f", sharing {sorted(shared)}")
    if source.kind == "single_file":
        pipe = cls.from_single_file(
            str(source.path),
            config=str(source.config),
            local_files_only=True,
            dtype=unet_dtype,
            add_watermarker=False,
            **shared,
        )
        if "vae" not in shared and pipe.vae.dtype != vae_dtype:
            pipe.vae.to(vae_dtype)
    else:
        has_fp16, has_plain = weight_variants(source.path)
        half = unet_dtype in (torch.float16, torch.bfloat16)
        variant = "fp16" if has_fp16 and (half or not has_plain) else None
        pipe = cls.from_pretrained(
            source.path,
            dtype={"default": unet_dtype, "vae": vae_dtype},
            local_files_only=True,
            variant=variant,
            add_watermarker=False,
            **shared,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_img2img(base: Any) -> Any:
    """An img2img pipeline over the base's own components (nothing is copied)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    c = base.components
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        text_encoder_2=c["text_encoder_2"],
        tokenizer=c["tokenizer"],
        tokenizer_2=c["tokenizer_2"],
        unet=c["unet"],
        scheduler=type(c["scheduler"]).from_config(c["scheduler"].config),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=bool(base.config.get("force_zeros_for_empty_prompt", True)),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
