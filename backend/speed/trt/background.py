"""TensorRT engines per size bucket, built in a background thread while jobs run eager; the UNet hook
that switches a call to the engine once its bucket's engine is ready.

The first UNet call at a new (bucket, batch) asks :class:`BackgroundEngines` for an engine. None is
ready yet, so that call (and every call until the engine is ready) runs the eager UNet, while a
background thread loads the engine from the cache (backend/speed/trt/cache.py) or, when there is none or it
is unusable, builds it (``build``: backend/speed/trt/unet.py runs the ONNX export and the TensorRT build in a
subprocess) and caches it. The next call after that runs on the engine. A build that fails is logged
once and that bucket stays eager; a call that fails on its engine switches every engine off for good
and runs eagerly (a job never fails because of the speed path).

``build`` and ``load`` are injected: the CPU tests use fakes, the service the real ones.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from .cache import EngineCache, EngineKey

log = logging.getLogger(__name__)

Runner = Callable[..., torch.Tensor]  # (sample, timestep, encoder_hidden_states, text_embeds, time_ids) -> noise
Slot = tuple[int, int, int]  # (width px, height px, batch)


@dataclass
class Failed:
    reason: str


class BackgroundEngines:
    """Engines by slot: loaded, building (``"pending"``) or failed."""

    def __init__(
        self,
        cache: EngineCache,
        key_for: Callable[[int, int, int], EngineKey],
        build: Callable[[EngineKey], bytes],
        load: Callable[[bytes], Runner],
    ) -> None:
        self.cache = cache
        self.key_for = key_for
        self.build = build
        self.load = load
        self.disabled: str | None = None  # why every engine was switched off, if they were
        self.timings: dict[Slot, dict[str, float]] = {}  # per slot: load_s, build_s, ready_at
        self._state: dict[Slot, Any] = {}
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._queue: queue.Queue[Slot | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    # --- asked by the UNet hook ----------------------------------------------------------------

    def get(self, width: int, height: int, batch: int) -> Runner | None:
        """The engine for this slot if it is ready; else None (and its build is queued once)."""
        if self.disabled is not None:
            return None
        slot = (width, height, batch)
        with self._lock:
            state = self._state.get(slot)
            if state is None:
                self._state[slot] = "pending"
                self._queue.put(slot)
                self._start()
                return None
        return _runner(state)

    def request(self, width: int, height: int, batch: int) -> None:
        """Queue the engine for this slot without a call (the warm-up bucket at start)."""
        self.get(width, height, batch)

    def status(self) -> dict[str, str]:
        """Per slot ("1024x1024 b2"): ready, pending or failed: why."""
        with self._lock:
            items = list(self._state.items())
        out = {}
        for (w, h, b), state in sorted(items):
            name = f"{w}x{h} b{b}"
            if callable(state):
                out[name] = "ready"
            else:
                out[name] = f"failed: {state.reason}" if isinstance(state, Failed) else str(state)
        return out

    def wait(self, width: int, height: int, batch: int, timeout: float | None = None) -> Runner | None:
        """Block until this slot's engine is ready or has failed (benchmarks, tests)."""
        self.get(width, height, batch)
        slot = (width, height, batch)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done:
            while self._state.get(slot) == "pending":
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._done.wait(left)
            state = self._state.get(slot)
        return _runner(state)

    def switch_off(self, reason: str) -> None:
        if self.disabled is None:
            self.disabled = reason[:2000]
            log.error("TensorRT: an engine call failed; the UNet runs eagerly from now on (%s)", reason[:300])

    def close(self) -> None:
        """Forget every engine (their GPU memory goes with them) and stop the background thread after the
        build in progress, if any. Later calls run eager."""
        self.disabled = self.disabled or "closed"
        with self._lock:
            self._state.clear()
        self._queue.put(None)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the background thread -----------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="krita-sdxl-trt-build", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            slot = self._queue.get()
            if slot is None:
                return
            self._make(slot)

    def _make(self, slot: Slot) -> None:
        name = f"{slot[0]}x{slot[1]} batch {slot[2]}"
        timing: dict[str, float] = {}
        started = time.monotonic()
        try:
            key = self.key_for(*slot)
            payload = self.cache.load(key)
            if payload is None:
                log.info("TensorRT: building the UNet engine for %s in the background (jobs run eager)", name)
                t = time.monotonic()
                payload = self.build(key)
                timing["build_s"] = time.monotonic() - t
                path = self.cache.save(key, payload)
                size = len(payload) / 1e6
                log.info("TensorRT: built %s in %.0f s (%s, %.0f MB)", name, timing["build_s"], path, size)
            t = time.monotonic()
            runner = self.load(payload)
            timing["load_s"] = time.monotonic() - t
            state: Any = runner
            waited = time.monotonic() - started
            log.info("TensorRT: the engine for %s is ready (%.1f s after it was asked for)", name, waited)
        except Exception as exc:
            state = Failed(f"{type(exc).__name__}: {exc}"[:1000])
            log.warning("TensorRT: no engine for %s, it runs eager (%s)", name, state.reason[:300])
        timing["ready_s"] = time.monotonic() - started
        with self._done:
            self.timings[slot] = timing
            if self.disabled != "closed":
                self._state[slot] = state
            else:
                self._state.pop(slot, None)
            self._done.notify_all()


# --- the UNet hook ---------------------------------------------------------------------------------


def _runner(state: Any) -> Runner | None:
    """A slot's engine, or None while it is "pending" or when its build failed (the failure's text)."""
    return cast(Runner, state) if callable(state) else None


def engine_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], text_tokens: int) -> dict[str, Any] | None:
    """The engine's inputs from a UNet call as diffusers' SDXL pipelines make it, or None when the call
    is one an engine cannot take (other arguments, other prompt length): that call runs eager."""
    names = ("sample", "timestep", "encoder_hidden_states")
    given = dict(zip(names, args, strict=False))
    if len(args) > len(names) or any(n in kwargs for n in given):
        return None
    call = {**given, **kwargs}
    allowed = (*names, "added_cond_kwargs", "return_dict")
    unsupported = {k for k, v in call.items() if v is not None and k not in allowed}
    added = call.get("added_cond_kwargs") or {}
    if unsupported or set(added) != {"text_embeds", "time_ids"}:
        return None
    sample, ehs = call.get("sample"), call.get("encoder_hidden_states")
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or not isinstance(ehs, torch.Tensor):
        return None
    if ehs.shape[0] != sample.shape[0] or ehs.shape[1] != text_tokens:
        return None
    return {
        "sample": sample,
        "timestep": call.get("timestep"),
        "encoder_hidden_states": ehs,
        "text_embeds": added["text_embeds"],
        "time_ids": added["time_ids"],
        "return_dict": call.get("return_dict", True),
    }


class TrtUnet:
    """Installed on a UNet (as its ``_compiled_call_impl``): each call runs its bucket's engine when
    that is ready, else the eager UNet."""

    def __init__(self, unet: torch.nn.Module, engines: BackgroundEngines, text_tokens: int = 77) -> None:
        self.unet = unet
        self.engines = engines
        self.text_tokens = text_tokens
        self.calls = {"engine": 0, "eager": 0}

    def install(self) -> TrtUnet:
        self.unet._compiled_call_impl = self  # type: ignore[assignment]
        return self

    def uninstall(self) -> None:
        if self.unet._compiled_call_impl is self:
            self.unet._compiled_call_impl = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = engine_inputs(args, kwargs, self.text_tokens)
        runner = None
        if inputs is not None:
            batch, _, rows, cols = inputs["sample"].shape
            runner = self.engines.get(cols * 8, rows * 8, batch)
        if runner is None or inputs is None:
            self.calls["eager"] += 1
            return self.unet._call_impl(*args, **kwargs)
        try:
            out = runner(
                inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["text_embeds"],
                inputs["time_ids"],
            )  # fmt: skip
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            self.engines.switch_off(f"{type(exc).__name__}: {exc}")
            self.calls["eager"] += 1
            return self.unet._call_impl(*args, **kwargs)
        self.calls["engine"] += 1
        if not inputs["return_dict"]:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


__all__ = ["BackgroundEngines", "Failed", "TrtUnet", "engine_inputs"]
