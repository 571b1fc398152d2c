"""The Ray Serve deployment: each replica loads the engine once (backend/engine/sdxl_engine.py, the same code as the
single-process service) on its GPU, or on the CPU, and keeps it resident for every job it runs.

``run`` streams one job's events: ``started`` (which replica, its state), ``progress`` (with a preview),
then exactly one of ``result``, ``error`` or ``cancelled``. The engine runs in the replica's one job
thread; this coroutine relays its events. When the caller cancels the stream (the client cancelled
the job), the coroutine is cancelled: it sets the flag the engine polls between steps and waits for
the engine to stop, so the replica is free again (and takes its next job) only once it has.

Jobs that need the base model name it as their multiplexed model id: Ray Serve then prefers replicas
that already hold it, so a mix of refine and generate jobs does not load the base on every replica.

A replica that cannot load its engine raises one line that starts with ``failures.MARKER`` and says where
and why (backend/pool/failures.py puts it in the service's message): Ray Serve's own message names only
the deployment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, cast

from ray import serve

from krita_sdxl.backend.common.config import Settings
from krita_sdxl.backend.service.worker import Outcome, run_engine

from . import transfer
from .failures import MARKER
from .shm import Mappings

log = logging.getLogger("krita_sdxl.pool")


def load(settings: Settings, gpu: bool) -> Any:
    """The engine, as ``serve`` loads it in one process; CPU replicas run torch on one thread."""
    from krita_sdxl.backend.engine.loading import configure_logging, load_engine, tiling

    configure_logging(settings.log_level)
    if settings.identity:
        from krita_sdxl.backend.engine.identity import IdentityEngine

        return IdentityEngine()
    import torch

    if not gpu:
        torch.set_num_threads(1)  # replicas share the host's cores; one thread each does not oversubscribe
    engine = load_engine(replace(settings, device="cuda" if gpu else "cpu"))
    engine.tiling = tiling(settings)
    return engine


@serve.deployment(name="Replica")
class Replica:
    def __init__(self, settings: Settings, gpu: bool) -> None:
        import ray

        node = ray.util.get_node_ip_address()
        _bind_to_node(node)
        try:
            self.engine = load(settings, gpu)
        except Exception as exc:
            raise RuntimeError(f"{MARKER}: on {node}: {type(exc).__name__}: {exc}{_gpu_hint(gpu, node)}") from None
        caps = self.engine.describe()
        self.scheduler = _scheduler_config(self.engine)
        self.mappings = Mappings()
        self.info = {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node": node,
            "pid": os.getpid(),
            "device": caps.get("device"),
            "gpu": caps.get("gpu"),
        }
        self.counts = {"jobs": 0, "cancelled": 0, "failed": 0, "stopped_at": None}
        self._jobs = ThreadPoolExecutor(1, thread_name_prefix="krita-sdxl-replica")  # the engine's one thread
        warm = getattr(self.engine, "warm_up", None)
        if settings.warmup and warm is not None:
            self._jobs.submit(warm)  # the speed path compiles; jobs wait behind it in the same thread

    def describe(self) -> dict[str, Any]:
        """The engine's capabilities, and the scheduler config the service plans steps with."""
        return {"capabilities": self.engine.describe(), "scheduler": self.scheduler, "replica": self.state()}

    def state(self, **more: Any) -> dict[str, Any]:
        live = getattr(self.engine, "live_capabilities", None)
        models = cast(dict[str, Any], live())["models"] if callable(live) else self.engine.describe().get("models", [])
        loaded = [m.get("role") for m in models if m.get("loaded", True)]
        return {**self.info, **self.counts, "models": loaded, **more}

    @serve.multiplexed(max_num_models_per_replica=2)
    async def _resident(self, model_id: str) -> str:
        """Marks ``model_id`` as held here, for Ray Serve's routing; the engine loads the base with the
        first job that needs it and keeps it."""
        return model_id

    async def run(self, shipped: dict[str, Any]) -> AsyncIterator[tuple]:
        model = serve.get_multiplexed_model_id()
        if model:
            await self._resident(model)  # pyright: ignore[reportCallIssue]  (serve.multiplexed keeps it a coroutine)
        try:
            req, pixels = transfer.land(shipped, self.mappings)
        except transfer.NeedStore as exc:  # another host: the dispatcher ships the job through the object store
            yield ("need_store", str(exc), self.state())
            return
        yield ("started", self.state(pixels=pixels))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple] = asyncio.Queue()
        stop = threading.Event()
        last = [0]

        def on_progress(step: int, total: int, preview: Any) -> None:
            last[0] = step
            packed = transfer.pack(preview) if preview is not None else None
            loop.call_soon_threadsafe(events.put_nowait, ("progress", step, total, packed))

        label = f"{self.info['replica']}:{req.seed}"
        future = loop.run_in_executor(self._jobs, run_engine, self.engine, req, on_progress, stop.is_set, label)
        try:
            while not (future.done() and events.empty()):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
        except asyncio.CancelledError:  # the caller cancelled: stop the engine at its next step, wait for it
            stop.set()
            await asyncio.shield(future)
            self.counts["cancelled"] += 1
            self.counts["stopped_at"] = last[0]
            log.info("job %s cancelled at step %d", label, last[0])
            raise
        yield self._final(future.result(), shipped)

    def _final(self, outcome: Outcome, shipped: dict[str, Any]) -> tuple:
        kind, images, fields = outcome
        self.counts["jobs"] += 1
        if kind == "result":
            assert images is not None
            return ("result", transfer.deliver(images["image"], shipped, self.mappings), fields, self.state())
        self.counts["failed" if kind == "error" else "cancelled"] += 1
        return (kind, fields, self.state())


def _bind_to_node(node: str) -> None:
    """Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on all interfaces ("[::]:0",
    unauthenticated; this pool never calls it): bind it to the node's own address instead (127.0.0.1 on a
    local pool). Runs in the replica's process, before Serve starts that server (after the constructor)."""
    from ray.serve._private import replica as serve_replica

    original = serve_replica.add_port_to_grpc_server
    if getattr(original, "krita_sdxl_bound", False):
        return
    host = f"[{node}]" if ":" in node else node

    def bound(server: Any, address: str) -> int:
        return original(server, f"{host}:0" if address == "[::]:0" else address)

    bound.krita_sdxl_bound = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = bound


def _gpu_hint(gpu: bool, node: str) -> str:
    """Why a GPU replica may fail where it runs: Ray gave it a GPU the host's PyTorch cannot see."""
    if not gpu:
        return ""
    try:
        import torch

        if torch.cuda.is_available():
            return ""
    except Exception:
        pass
    return (
        f" (Ray placed this GPU replica on {node}, which claims a GPU, but PyTorch there sees no CUDA device: "
        "check that host's `ray start --num-gpus` and its PyTorch build)"
    )


def _scheduler_config(engine: Any) -> dict[str, Any] | None:
    pipe = getattr(engine, "pipe", None)
    return dict(pipe.scheduler.config) if pipe is not None else None
