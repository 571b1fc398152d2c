"""Where a model comes from: a diffusers folder, a Hugging Face repo id in the local cache, or a
single-file checkpoint (``sd_xl_refiner_1.0.safetensors``, ``sd_xl_base_1.0.safetensors``, or any
fine-tune of the same architecture).

A single file holds only weights; ``from_single_file`` also needs a diffusers *config* folder
(model_index.json, every component's config, the CLIP tokenizer files). The SDXL 1.0 ones ship in
``backend/models/configs/`` (written by ``packaging/make_sdxl_configs.py``), so nothing is downloaded at
load time; ``--model-config`` / ``--base-model-config`` name another folder for another architecture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from krita_sdxl.backend.setup.plan import hub

from .demo import ensure_demo_models
from .refiner import DEFAULT_REFINER, ModelNotFound, _check_folder, _looks_like_path, _snapshot, hf_cache_dir

log = logging.getLogger(__name__)

DEFAULT_BASE = hub.BASE_REPO
CONFIGS = Path(__file__).resolve().parent / "configs"
SHIPPED_CONFIGS = {"refiner": CONFIGS / "sdxl-refiner-1.0", "base": CONFIGS / "sdxl-base-1.0"}
SINGLE_FILE_SUFFIXES = (".safetensors",)
DEFAULTS = {"refiner": DEFAULT_REFINER, "base": DEFAULT_BASE}
NO_MODEL = ("", "none")  # --base-model none: no base model (refine only)


@dataclass(frozen=True)
class ModelSource:
    role: str  # "refiner" or "base"
    kind: str  # "folder", "hub", "single_file" or "demo"
    path: Path  # the diffusers folder, or the checkpoint file
    name: str  # for people
    config: Path | None = None  # single_file: the diffusers config folder it is loaded with

    def scheduler_config(self) -> dict[str, Any] | None:
        """The scheduler config the model loads with (its folder's, or the config folder of a single file),
        read without loading anything; None when there is none to read."""
        import json

        folder = Path(self.config if self.config is not None else self.path)
        try:
            data = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        named = index.get("scheduler") if isinstance(index, dict) else None
        if isinstance(named, list) and len(named) == 2 and isinstance(named[1], str):
            data["_class_name"] = named[1]  # the class diffusers loads is the one model_index.json names
        return data

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "name": self.name, "path": str(self.path), "source": self.kind}
        if self.config is not None:
            out["config"] = str(self.config)
        return out


def _config_folder(role: str, config: str | Path | None) -> Path:
    folder = Path(config).expanduser() if config else SHIPPED_CONFIGS[role]
    if not (folder / "model_index.json").is_file():
        raise ModelNotFound(
            f"config folder {folder} for the single-file {role} checkpoint has no model_index.json; "
            "it must be a diffusers model folder without weights (model_index.json, unet/config.json, "
            "vae/config.json, text encoder configs, tokenizer files), like the ones in "
            f"{CONFIGS}"
        )
    return folder


def _single_file(role: str, path: Path, config: str | Path | None) -> ModelSource:
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelNotFound(
            f"{path} is a file, but not a .safetensors checkpoint; pass a single-file .safetensors checkpoint "
            "(such as sd_xl_refiner_1.0.safetensors), a diffusers folder or a Hugging Face repo id"
        )
    return ModelSource(role, "single_file", path, path.name, _config_folder(role, config))


def resolve_source(
    role: str,
    model: str | None = None,
    *,
    demo: bool = False,
    allow_download: bool = False,
    cache_dir: Path | None = None,
    config: str | Path | None = None,
) -> ModelSource:
    """The source of the ``role`` model (``refiner`` or ``base``); raises :class:`ModelNotFound`.

    ``demo``: the tiny demo model. ``model`` None: the SDXL 1.0 model of that role from the local
    Hugging Face cache. Else a ``.safetensors`` file, a diffusers folder, or a repo id (local cache;
    downloaded only when ``allow_download``).
    """
    if role not in DEFAULTS:
        raise ValueError(f"role must be refiner or base, got {role!r}")
    if demo:
        paths = ensure_demo_models(cache_dir)
        return ModelSource(role, "demo", getattr(paths, role), f"demo-v1 {role} (tiny random weights)")
    repo = model or DEFAULTS[role]
    path = Path(repo).expanduser()
    if path.is_file():
        return _single_file(role, path, config)
    if model is not None and (path.exists() or _looks_like_path(model)):
        return ModelSource(role, "folder", _check_folder(path), model)
    try:
        return ModelSource(role, "hub", _snapshot(repo, allow_download, hf_cache_dir()), repo)
    except ModelNotFound as exc:
        if model is None:
            raise
        raise ModelNotFound(f"{exc} (There is no local folder or file named {model!r} either.)") from exc.__cause__


def resolve_base(
    model: str | None = None,
    *,
    demo: bool = False,
    allow_download: bool = False,
    cache_dir: Path | None = None,
    config: str | Path | None = None,
) -> ModelSource | None:
    """The base model's source, or None when there is none.

    ``model`` None: the demo base with ``demo``, else the SDXL 1.0 base *if* it is in the local cache
    (never downloaded; absent = no generate modes). ``"none"``: no base. Anything else must be found
    (:class:`ModelNotFound` otherwise), downloaded only when ``allow_download``.
    """
    if model is not None and model.strip().lower() in NO_MODEL:
        return None
    if demo and model is None:
        return resolve_source("base", demo=True, cache_dir=cache_dir)
    if model is None:
        try:
            return resolve_source("base", None, allow_download=False, cache_dir=cache_dir)
        except ModelNotFound as exc:
            log.info("no base model (generate and two_stage modes off): %s", exc)
            return None
    return resolve_source("base", model, allow_download=allow_download, cache_dir=cache_dir, config=config)
