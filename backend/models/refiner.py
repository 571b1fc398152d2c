"""Device and dtype choice, finding the refiner on disk, and loading it.

One code path loads the real SDXL refiner (a Hugging Face cache snapshot or any diffusers folder)
and the tiny offline demo model: ``StableDiffusionXLImg2ImgPipeline.from_pretrained`` on a folder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from krita_sdxl.backend.setup.plan import hub

from .demo import ensure_demo_models

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLImg2ImgPipeline

log = logging.getLogger(__name__)

DEFAULT_REFINER = hub.REFINER_REPO
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# What a refiner folder needs (one rule with `krita-sdxl setup`'s downloads: setup/plan/hub.py).
FP16_PATTERNS = hub.FP16_PATTERNS
PLAIN_PATTERNS = hub.PLAIN_PATTERNS
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFound(Exception):
    """The requested model is not on disk (or cannot be fetched); the message says what to do."""


# --- device and dtype ---------------------------------------------------------------------------


def _available_devices() -> list[str]:
    found = []
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def pick_device(requested: str = "auto") -> str:
    """``auto``: cuda, then mps, then cpu. An explicit device that is not available raises ValueError."""
    available = _available_devices()
    if requested == "auto":
        return available[0]
    if requested in available:
        return requested
    raise ValueError(f"device {requested!r} is not available on this machine; available: {', '.join(available)}")


def _device_type(device: str) -> str:
    return device.split(":", 1)[0]


def pick_dtypes(device: str, requested: str = "auto") -> tuple[torch.dtype, torch.dtype]:
    """(UNet and text-encoder dtype, VAE dtype) for ``device``.

    auto: cuda fp16 with the VAE in bf16 where the card supports it, else fp32 (the stock SDXL VAE
    overflows in fp16); mps fp16 with an fp32 VAE; cpu fp32. ``fp16``/``bf16``/``fp32`` override the
    UNet dtype; the VAE keeps the device's choice (fp32 when fp32 is requested) and is never fp16.
    """
    kind = _device_type(device)
    if kind == "cuda":
        default_unet = torch.float16
        vae = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    elif kind == "mps":
        default_unet, vae = torch.float16, torch.float32
    else:
        default_unet, vae = torch.float32, torch.float32
    if requested == "auto":
        return default_unet, vae
    if requested not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {requested!r}")
    if requested == "fp32":
        vae = torch.float32
    return DTYPES[requested], vae


# --- finding the refiner ------------------------------------------------------------------------


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    return hub.hf_cache_dir()


_WAYS_OUT = (
    "pass --model PATH to a diffusers folder, a single-file .safetensors checkpoint or a Hugging Face repo id, "
    "or try --demo for the tiny offline demo model"
)


def _check_folder(path: Path) -> Path:
    if not path.exists():
        raise ModelNotFound(f"model folder {path} does not exist; {_WAYS_OUT}")
    if path.is_file():
        raise ModelNotFound(
            f"{path} is a file, but a model must be a diffusers folder (model_index.json, unet/, vae/, ...); "
            f"single-file checkpoints are not supported here (models/sources.py loads them); {_WAYS_OUT}"
        )
    if not (path / "model_index.json").is_file():
        raise ModelNotFound(
            f"folder {path} has no model_index.json, so it is not a diffusers pipeline folder like "
            f"stabilityai/stable-diffusion-xl-refiner-1.0; {_WAYS_OUT}"
        )
    return path


def _looks_like_path(model: str) -> bool:
    """Anything but ``owner/name`` (absolute, ~, ./, Windows or deeper paths) is a path."""
    return not _REPO_ID.match(model)


def _not_cached_message(repo_id: str, cache: Path, detail: str) -> str:
    return (
        f"model {repo_id!r} is not in the local Hugging Face cache ({cache}){detail}. "
        f"Download it once with: hf download {repo_id} --include '*.json' '*.txt' '*/*.fp16.safetensors' ; "
        "or start with --allow-download; or pass --model PATH to a diffusers folder; "
        "or try --demo for the tiny offline demo model."
    )


def _snapshot(repo_id: str, allow_download: bool, cache: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if allow_download:
        log.info("fetching %s (fp16 weights) into %s", repo_id, cache)
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=FP16_PATTERNS))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            raise ModelNotFound(
                f"could not download model {repo_id!r} into {cache}: {type(exc).__name__}: {exc}. "
                "Check the network and the repo id; or pass --model PATH to a diffusers folder; "
                "or try --demo for the tiny offline demo model."
            ) from exc
    last: Exception | None = None
    for patterns in (FP16_PATTERNS, PLAIN_PATTERNS):
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True, allow_patterns=patterns))
        except LocalEntryNotFoundError as exc:  # includes IncompleteSnapshotError
            last = exc
    detail = f" or its snapshot is incomplete ({last})" if "incomplete" in str(last) else ""
    raise ModelNotFound(_not_cached_message(repo_id, cache, detail)) from last


def resolve_refiner(
    model: str | None = None,
    demo: bool = False,
    allow_download: bool = False,
    cache_dir: Path | None = None,
) -> Path:
    """The diffusers folder of the refiner to load.

    ``demo``: the tiny demo model (built into ``cache_dir`` if missing). ``model``: an existing folder
    with model_index.json, or a Hugging Face repo id (default: the SDXL 1.0 refiner) looked up in the
    local hub cache, downloaded only when ``allow_download``. Raises :class:`ModelNotFound`.
    """
    if demo:
        return ensure_demo_models(cache_dir).refiner
    if model is None:
        return _snapshot(DEFAULT_REFINER, allow_download, hf_cache_dir())
    path = Path(model).expanduser()
    if path.exists() or _looks_like_path(model):
        return _check_folder(path)
    try:
        return _snapshot(model, allow_download, hf_cache_dir())
    except ModelNotFound as exc:  # maybe a mistyped relative path rather than a repo id
        raise ModelNotFound(f"{exc} (There is no local folder named {model!r} either.)") from exc.__cause__


# --- loading ------------------------------------------------------------------------------------


def weight_variants(path: Path) -> tuple[bool, bool]:
    """(has fp16 variant weights, has plain weights) in the model's component folders."""
    files = [f.name for f in path.glob("*/*.safetensors")] + [f.name for f in path.glob("*/*.bin")]
    fp16 = any(".fp16." in name for name in files)
    plain = any(".fp16." not in name for name in files)
    return fp16, plain


def load_refiner(
    path: Path, device: str, unet_dtype: torch.dtype, vae_dtype: torch.dtype
) -> StableDiffusionXLImg2ImgPipeline:
    """Load a refiner folder onto ``device``: UNet and text encoder in ``unet_dtype``, VAE in ``vae_dtype``."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    has_fp16, has_plain = weight_variants(path)
    half = unet_dtype in (torch.float16, torch.bfloat16)
    variant = "fp16" if has_fp16 and (half or not has_plain) else None
    log.info("loading refiner from %s (variant %s) on %s", path, variant or "default", device)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        path,
        dtype={"default": unet_dtype, "vae": vae_dtype},
        local_files_only=True,
        variant=variant,
        add_watermarker=False,
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
