"""The single GPU worker thread: takes the next fair job from the queue and runs it on the engine.

It never touches the ROUTER socket (ZeroMQ sockets are not thread-safe): every event it produces
goes to the I/O thread through an inproc PUSH socket as [routing id, CURVE key, *message frames].
Nothing a job does stops the thread: every job ends with exactly one final event, and an event
that cannot be encoded becomes an ``internal`` error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from krita_sdxl.backend.common.logtext import escaped
from krita_sdxl.backend.engine.request import JobCancelled, ProgressFn, RefineRequest, StopFn
from krita_sdxl.backend.models import oom
from krita_sdxl.protocol import SERVICE, Image, encode
from krita_sdxl.protocol import errors as codes
from krita_sdxl.protocol.codec import error_event, stream_buffers

from .jobs import Job, JobQueue

log = logging.getLogger(__name__)

Outcome = tuple[str, "dict[str, Image] | None", dict[str, Any]]  # a job's final event: type, images, fields


def result_bytes(outcome: Outcome | None) -> int:
    """The bytes a job's final event streams to its owner (a result's pixels; 0 for any other end): what
    the queue counts for the owner from the job's end until the client has them (backend/service/transfers.py)."""
    if outcome is None or outcome[0] != "result":
        return 0
    return sum(memoryview(b).nbytes for b in stream_buffers("result", outcome[1] or {}))


class Described(Protocol):
    """What the service itself asks of an engine (the worker or the pool's dispatcher runs the jobs)."""

    def describe(self) -> dict[str, Any]: ...


class Engine(Described, Protocol):
    def refine(self, req: RefineRequest, on_progress: ProgressFn, should_stop: StopFn) -> Image: ...


class WorkerLike(Protocol):
    """What the service starts and joins: the one worker thread, or the pool's dispatcher."""

    def start(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


WorkerFactory = Callable[..., WorkerLike]  # called as Worker(ctx, events_endpoint, queue, engine, warm_up=...)


class Worker(threading.Thread):
    def __init__(
        self,
        ctx: zmq.Context,
        events_endpoint: str,
        queue: JobQueue,
        engine: Engine,
        on_idle: Callable[[], None] | None = None,
        warm_up: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(name="krita-sdxl-worker", daemon=True)
        self._ctx = ctx
        self._endpoint = events_endpoint
        self._queue = queue
        self._engine = engine
        self._on_idle = on_idle
        self._warm_up = warm_up  # runs once, in this thread, before the first job (jobs queue meanwhile)
        self._push: zmq.Socket | None = None

    def _emit(
        self,
        job: Job,
        msg_type: str,
        images: dict[str, Image] | None = None,
        fields: dict[str, Any] | None = None,
        **more: Any,
    ) -> None:
        assert self._push is not None
        frames = encode(SERVICE, msg_type, images=images, job=job.id, **(fields or {}), **more)
        frames += stream_buffers(msg_type, images or {})  # a result's pixels: the service streams them
        self._push.send_multipart([job.owner.routing, job.owner.key, *frames], copy=False)

    def _finish(self, job: Job, msg_type: str, images: dict[str, Image] | None, fields: dict[str, Any]) -> None:
        """The job's final event; if it cannot be sent as made, an ``internal`` error instead."""
        if msg_type == "error":
            code, message = fields.get("code", codes.INTERNAL), fields.get("message", "")
            fields = error_event(job.id, code, message, fields.get("field"))
            fields.pop("job")
        try:
            self._emit(job, msg_type, images, fields)
        except Exception as exc:
            log.exception("job %s: its %s event could not be sent", escaped(job.id, 80), msg_type)
            self._queue.release(job.owner.account, result_bytes((msg_type, images, fields)))  # counted at done
            error = error_event(job.id, codes.INTERNAL, f"internal error: the {msg_type} event failed: {exc}")
            error.pop("job")
            self._emit(job, "error", None, error)

    def run(self) -> None:
        push = self._push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(self._endpoint)
        try:
            if self._warm_up is not None:
                try:
                    self._warm_up()
                except Exception:  # jobs still run, only without the warm-up
                    log.exception("warm-up failed; serving jobs without it")
            while True:
                job = self._queue.take()
                if job is None:
                    return
                outcome: Outcome | None = None
                try:
                    outcome = self._run_job(job)
                except Exception as exc:  # a bug outside the engine: the job still gets its answer
                    log.exception("job %s: internal error", escaped(job.id, 80))
                    outcome = ("error", None, {"code": codes.INTERNAL, "message": f"internal error: {exc!r}"})
                finally:  # before the final event: a client that reacts sees it gone
                    self._queue.done(job, result_bytes(outcome))
                assert outcome is not None
                try:
                    self._finish(job, *outcome)
                    if self._on_idle is not None and len(self._queue) == 0:
                        self._on_idle()
                except Exception:
                    log.exception("job %s: could not report its end", escaped(job.id, 80))
        finally:
            push.close()

    def _run_job(self, job: Job) -> Outcome:
        """Run one job; returns its final event (type, images, fields)."""
        if job.cancel.is_set():
            return "cancelled", None, {"reason": job.cancel_reason}

        def on_progress(step: int, total: int, preview: Image | None) -> None:
            images = {"preview": preview} if preview is not None else None
            try:
                self._emit(job, "progress", images=images, step=step, total=total)
            except Exception:  # a lost progress event must not fail the job
                log.exception("job %s: a progress event could not be sent", escaped(job.id, 80))

        label = escaped(job.id, 80)
        return run_engine(self._engine, job.payload, on_progress, job.cancel.is_set, label, lambda: job.cancel_reason)


def run_engine(
    engine: Engine,
    req: RefineRequest,
    on_progress: ProgressFn,
    should_stop: StopFn,
    label: str,
    cancel_reason: Callable[[], str] = lambda: "cancelled",
) -> Outcome:
    """One job on ``engine``, whatever it does: its final event (type, images, fields). Shared by the
    worker thread and the pool's replicas (backend/pool/replica.py), so both classify failures alike."""
    t0 = time.perf_counter()
    log.info(
        "job %s: refine %dx%d, %d of %d steps, seed %d",
        label,
        req.image.spec.width,
        req.image.spec.height,
        req.plan.denoise_steps,
        req.plan.steps,
        req.seed,
    )
    try:
        result = engine.refine(req, on_progress, should_stop)
    except JobCancelled:
        log.info("job %s cancelled (%s)", label, cancel_reason())
        return "cancelled", None, {"reason": cancel_reason()}
    except Exception as exc:  # the service must keep serving whatever a job does
        if oom.is_out_of_memory(exc):  # backend/models/oom.py: the advice, freeing memory, the retry policy
            log.error("job %s ran out of memory: %s", label, exc)
            message = oom.job_message(exc)
            oom.free_memory()  # best effort here; the engine frees outside its except blocks
            return "error", None, {"code": codes.OUT_OF_MEMORY, "field": None, "message": message}
        log.exception("job %s failed", label)
        message = f"the pipeline failed: {type(exc).__name__}: {exc}"
        return "error", None, {"code": codes.MODEL_ERROR, "field": None, "message": message}
    elapsed = time.perf_counter() - t0
    log.info("job %s done in %.3f s", label, elapsed)
    return "result", {"image": result}, {"seed": req.seed, "elapsed": elapsed}
