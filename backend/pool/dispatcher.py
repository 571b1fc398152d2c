"""The pool's stand-in for the worker thread: slots that each keep one job in flight on the replicas.

A slot is a :class:`~krita_sdxl.backend.service.worker.Worker` (same queue, same inproc PUSH path, same final
event rules) whose job runs on whichever replica Ray Serve routes it to: the slot takes the next fair
job from the JobQueue, ships its pixels, calls the deployment with a streaming DeploymentHandle call
and forwards ``progress`` (and previews) as they come, then the final event.

- Cancel: a watcher thread cancels the streaming call of a job whose cancel flag is set; the replica
  stops its engine at the next step (backend/pool/replica.py) and the slot reports ``cancelled``.
- A replica that dies mid-job (its process killed, its host gone): the job runs once more on another
  replica (Ray Serve replaces the dead one); progress resumes after the last step already sent. If that
  replica dies too, the job ends with a ``model_error`` that says so. No job is dropped silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from ray.exceptions import (
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    OwnerDiedError,
    RayActorError,
    WorkerCrashedError,
)
from ray.serve.exceptions import RequestCancelledError

from krita_sdxl.backend.service.jobs import Job, JobQueue
from krita_sdxl.backend.service.worker import Outcome, Worker
from krita_sdxl.protocol import errors as codes

from . import transfer
from .capabilities import ReplicaBook
from .plan import routing_key

log = logging.getLogger("krita_sdxl.pool")

# the replica (its process or its host) is gone: the job may run again elsewhere
REPLICA_LOST = (
    RayActorError,
    ActorUnavailableError,
    WorkerCrashedError,
    NodeDiedError,
    ObjectLostError,
    OwnerDiedError,
)
ATTEMPTS = 2  # a job whose replica dies runs once more on another one
CANCEL_POLL_S = 0.05
REFRESH_S = 2.0


class InFlight:
    """The streaming calls in progress, for the cancel watcher."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Job, Any] = {}
        self._cancelled: set[Job] = set()

    def add(self, job: Job, response: Any) -> None:
        with self._lock:
            self._calls[job] = response

    def remove(self, job: Job) -> None:
        with self._lock:
            self._calls.pop(job, None)
            self._cancelled.discard(job)

    def cancel_flagged(self) -> None:
        """Cancel the call of every job whose cancel flag is set (once each)."""
        with self._lock:
            flagged = [(j, r) for j, r in self._calls.items() if j.cancel.is_set() and j not in self._cancelled]
            self._cancelled.update(j for j, _ in flagged)
        for job, response in flagged:
            log.info("job %s: cancelling it on replica %s", job.id, job.runner)
            response.cancel()


class ReplicaSlot(Worker):
    def __init__(
        self, ctx: zmq.Context, endpoint: str, queue: JobQueue, handle: Any, book: ReplicaBook, calls: InFlight, n: int
    ) -> None:
        super().__init__(ctx, endpoint, queue, engine=None)  # type: ignore[arg-type]  # jobs run on the replicas
        self.name = f"krita-sdxl-pool-slot-{n}"
        self._handle = handle
        self._book = book
        self._calls = calls

    def _run_job(self, job: Job) -> Outcome:
        if job.cancel.is_set():
            return "cancelled", None, {"reason": job.cancel_reason}
        shipped = transfer.ship(job.payload)  # into the object store once, for every attempt
        sent = [0]  # the last progress step forwarded: a rerun does not repeat steps the client saw
        lost: list[str] = []
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return self._attempt(job, shipped, sent)
            except REPLICA_LOST as exc:
                where = job.runner or "a replica"
                lost.append(f"{where} ({type(exc).__name__})")
                if job.cancel.is_set():
                    return "cancelled", None, {"reason": job.cancel_reason}
                if attempt < ATTEMPTS:
                    log.warning("job %s: replica %s died while running it; running it again on another", job.id, where)
                job.runner = None
        message = (
            f"the pool replica running this job stopped (its process died: {lost[0]}), and so did the replica it "
            f"was run again on ({lost[-1]}); submit it again"
        )
        log.error("job %s: %s", job.id, message)
        return "error", None, {"code": codes.MODEL_ERROR, "field": None, "message": message}

    def _attempt(self, job: Job, shipped: dict[str, Any], sent: list[int]) -> Outcome:
        call = self._handle.options(method_name="run", stream=True, multiplexed_model_id=routing_key(job.payload))
        response = call.remote(shipped)
        self._calls.add(job, response)
        replica: str | None = None
        try:
            for event in response:
                kind = event[0]
                if kind == "started":
                    replica = job.runner = event[1]["replica"]
                    self._book.started(event[1], job.id)
                elif kind == "progress":
                    _, step, total, preview = event
                    if step > sent[0]:
                        sent[0] = step
                        self._progress(job, step, total, preview)
                else:
                    self._book.finished(event[-1])
                    return _outcome(event)
        except RequestCancelledError:
            if replica is not None:
                self._book.idle(replica)
            if not job.cancel.is_set():
                raise
            return "cancelled", None, {"reason": job.cancel_reason}
        except REPLICA_LOST:
            if replica is not None:
                self._book.lost(replica)
            raise
        finally:
            self._calls.remove(job)
        raise RuntimeError("the replica's event stream ended without a result")

    def _progress(self, job: Job, step: int, total: int, preview: transfer.Packed | None) -> None:
        images = {"preview": transfer.unpack(preview)} if preview is not None else None
        try:
            self._emit(job, "progress", images=images, step=step, total=total)
        except Exception:  # a lost progress event must not fail the job
            log.exception("job %s: a progress event could not be sent", job.id)


def _outcome(event: tuple) -> Outcome:
    kind = event[0]
    if kind == "result":
        return "result", {"image": transfer.unpack(event[1])}, event[2]
    return kind, None, event[1]


class Dispatcher:
    """Started and joined by the service as its worker is: ``slots`` ReplicaSlot threads, the cancel
    watcher and the refresher of the replicas' state."""

    def __init__(
        self,
        ctx: zmq.Context,
        events_endpoint: str,
        queue: JobQueue,
        engine: Any = None,
        warm_up: Callable[[], Any] | None = None,
        *,
        handle: Any,
        book: ReplicaBook,
        slots: int,
        serve_view: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self._calls = InFlight()
        self._book = book
        self._serve_view = serve_view
        self._done = threading.Event()
        self.slots = [ReplicaSlot(ctx, events_endpoint, queue, handle, book, self._calls, n) for n in range(slots)]
        self._watcher = threading.Thread(target=self._watch, name="krita-sdxl-pool-watch", daemon=True)
        self._refresher = threading.Thread(target=self._refresh, name="krita-sdxl-pool-refresh", daemon=True)

    def start(self) -> None:
        for slot in self.slots:
            slot.start()
        self._watcher.start()
        if self._serve_view is not None:
            self._refresher.start()

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for slot in self.slots:
            slot.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        self._calls.cancel_flagged()
        self._done.set()
        self._watcher.join(1.0)

    def is_alive(self) -> bool:
        return any(slot.is_alive() for slot in self.slots)

    def _watch(self) -> None:
        while not self._done.wait(CANCEL_POLL_S):
            try:
                self._calls.cancel_flagged()
            except Exception:
                log.exception("pool: a cancel failed; serving on")

    def _refresh(self) -> None:
        assert self._serve_view is not None
        while not self._done.wait(REFRESH_S):
            try:
                self._book.refresh(self._serve_view())
            except Exception as exc:  # the controller is busy or restarting: the next refresh catches up
                log.debug("pool: could not read the replicas' state: %s", exc)
