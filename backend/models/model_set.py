"""The models a service holds: the refiner, the base (loaded the first time a mode needs it), and
their placement in memory. ``unload`` frees one; the next job that needs it loads it again."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from .memory import Placement
from .pipelines import base_img2img, load_pipeline, shareable
from .sources import ModelSource

log = logging.getLogger(__name__)

ROLES = ("refiner", "base")


class ModelUnavailable(RuntimeError):
    """A job needs a model this service has no source for."""


def same_scheduler(a: Any, b: Any) -> bool:
    """The same kind of scheduler with the same settings (the base's img2img pipeline has a copy of its own)."""
    return type(a) is type(b) and dict(a.config) == dict(b.config)


class ModelSet:
    def __init__(
        self,
        placement: Placement,
        unet_dtype: torch.dtype,
        vae_dtype: torch.dtype,
        refiner: ModelSource | None = None,
        base: ModelSource | None = None,
        refiner_pipe: Any = None,
        on_load: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.placement = placement
        self.unet_dtype = unet_dtype
        self.vae_dtype = vae_dtype
        self.sources: dict[str, ModelSource | None] = {"refiner": refiner, "base": base}
        self.on_load = on_load
        self._pipes: dict[str, Any] = {}
        self._img2img: Any = None
        self._lock = threading.RLock()
        if refiner_pipe is not None:
            placement.install(refiner_pipe)
            self._pipes["refiner"] = refiner_pipe

    # --- what there is --------------------------------------------------------------------------

    def available(self, role: str) -> bool:
        return self.sources.get(role) is not None or role in self._pipes

    def loaded(self, role: str) -> bool:
        return role in self._pipes

    def if_loaded(self, role: str) -> Any:
        """The ``role`` pipeline when it is loaded now, else None (never loads)."""
        return self._pipes.get(role)

    def pipes(self) -> list[Any]:
        with self._lock:
            return list(self._pipes.values())

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for role in ROLES:
            source = self.sources.get(role)
            if source is None and role not in self._pipes:
                continue
            entry = source.describe() if source is not None else {"role": role, "name": role, "path": None}
            entry["loaded"] = role in self._pipes
            out.append(entry)
        return out

    # --- loading --------------------------------------------------------------------------------

    def get(self, role: str) -> Any:
        """The ``role`` pipeline, loaded (and placed) now if it is not."""
        with self._lock:
            pipe = self._pipes.get(role)
            if pipe is not None:
                return pipe
            source = self.sources.get(role)
            if source is None:
                raise ModelUnavailable(f"this service has no {role} model")
            others = [p for r, p in self._pipes.items() if r != role]
            pipe = load_pipeline(
                source, self.unet_dtype, self.vae_dtype, shareable(source, others[0] if others else None)
            )
            self.placement.install(pipe)
            self._pipes[role] = pipe
        if self.on_load is not None:
            self.on_load(role, pipe)
        return pipe

    def set_refiner(self, pipe: Any) -> None:
        self.put("refiner", pipe)

    def put(self, role: str, pipe: Any) -> None:
        """Use an already loaded pipeline for ``role`` (placed now)."""
        with self._lock:
            self.placement.install(pipe)
            self._pipes[role] = pipe
            if role == "base":
                self._img2img = None

    @property
    def refiner(self) -> Any:
        return self.get("refiner")

    @property
    def base(self) -> Any:
        return self.get("base")

    def base_img2img(self) -> Any:
        """The base's components as an img2img pipeline (for generate with a source image)."""
        base = self.base
        with self._lock:
            if (
                self._img2img is None
                or self._img2img.unet is not base.unet
                or not same_scheduler(self._img2img.scheduler, base.scheduler)
            ):
                self._img2img = base_img2img(base)
            return self._img2img

    # --- unloading ------------------------------------------------------------------------------

    def unload(self, role: str) -> bool:
        """Free the ``role`` model (what the other model shares stays). Returns whether it was loaded."""
        from .oom import free_memory

        with self._lock:
            pipe = self._pipes.pop(role, None)
            if pipe is None:
                return False
            if role == "base":
                self._img2img = None
            kept = {id(m) for p in self._pipes.values() for m in p.components.values()}
            own = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module) and id(m) not in kept]
            self.placement.forget(own)
            del pipe, own
        free_memory()
        log.info("unloaded the %s", role)
        return True
