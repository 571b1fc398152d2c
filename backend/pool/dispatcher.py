"""The pool's stand-in for the worker thread: slots that each keep one job in flight on the replicas.

A slot is a :class:`~krita_sdxl.backend.service.worker.Worker` (same queue, same inproc PUSH path, same final
event rules) whose job runs on whichever replica Ray Serve routes it to: the slot takes the next fair
job from the JobQueue, ships its pixels (backend/pool/transfer.py), calls the deployment with a streaming
DeploymentHandle call and forwards ``progress`` (and previews) as they come, then the final event.

- Cancel: a watcher thread cancels the streaming call of a job whose cancel flag is set; the replica
  stops its engine at the next step (backend/pool/replica.py) and the slot reports ``cancelled``.
- A replica that dies mid-job (its process killed, its host gone): the job runs once more on another
  replica (Ray Serve replaces the dead one); progress resumes after the last step already sent. If that
  replica dies too, the job ends with a ``model_error`` that says so. No job is dropped silently.
- No wait is unbounded: a call's events come through a queue the slot reads with a deadline. A job that
  has no replica to start on (none running: all lost, none could start again) ends with ``model_error``
  after ``--replica-timeout`` (at once when Ray Serve has given the deployment up), with what Ray Serve
  says about it; a started job whose replica sends nothing for :data:`SILENCE_S` ends too.
"""

from __future__ import annotations

import logging
import queue
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
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError, RequestCancelledError

from krita_sdxl.backend.service.jobs import Job, JobQueue
from krita_sdxl.backend.service.worker import Outcome, Worker
from krita_sdxl.protocol import errors as codes

from . import failures, transfer
from .capabilities import ReplicaBook
from .plan import routing_key
from .shm import SlotBuffers

log = logging.getLogger("krita_sdxl.pool")


class ReplicaSilent(Exception):
    """A started job's replica sent nothing for SILENCE_S (frozen, or its host unreachable)."""


# the replica (its process or its host) is gone: the job may run again elsewhere
REPLICA_LOST = (
    ReplicaSilent,
    RayActorError,
    ActorUnavailableError,
    WorkerCrashedError,
    NodeDiedError,
    ObjectLostError,
    OwnerDiedError,
    ReplicaUnavailableError,
)
ATTEMPTS = 2  # a job whose replica dies runs once more on another one
CANCEL_POLL_S = 0.05
REFRESH_S = 2.0
TICK_S = 0.5  # how often a waiting slot looks at the pool's state
GIVEN_UP_S = 5.0  # no replica and Ray Serve has given the deployment up: the job ends after this
SILENCE_S = 900.0  # a started job's replica sent nothing for this long (a first job may compile or load for minutes)
END = object()  # the end of a call's events


class Remote:
    """Replicas that cannot open this host's shared memory (another host): while one of them runs, jobs
    ship their pixels through the object store as well."""

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def add(self, replica: str) -> None:
        self._ids.add(replica)

    def any_in(self, running: list[str]) -> bool:
        return bool(self._ids.intersection(running))


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
        self,
        ctx: zmq.Context,
        endpoint: str,
        queue: JobQueue,
        handle: Any,
        book: ReplicaBook,
        calls: InFlight,
        n: int,
        replica_timeout: float,
        buffers: SlotBuffers | None = None,
        remote: Remote | None = None,
    ) -> None:
        super().__init__(ctx, endpoint, queue, engine=None)  # type: ignore[arg-type]  # jobs run on the replicas
        self.name = f"krita-sdxl-pool-slot-{n}"
        self._handle = handle
        self._book = book
        self._calls = calls
        self._replica_timeout = replica_timeout
        self.buffers = buffers
        self._remote = remote or Remote()
        self._ended_by_replica = False  # the job's last event came from its replica: its files are free again

    def _run_job(self, job: Job) -> Outcome:
        if job.cancel.is_set():
            return "cancelled", None, {"reason": job.cancel_reason}
        self._ended_by_replica = False
        try:
            return self._run_attempts(job)
        finally:
            if not self._ended_by_replica and self.buffers is not None:
                self.buffers.retire()  # a replica may still write the old files: the next job gets new ones

    def _run_attempts(self, job: Job) -> Outcome:
        via_store = self.buffers is None or self._remote.any_in(self._book.running())
        shipped = transfer.ship(job.payload, self.buffers, via_store)  # once, for every attempt
        sent = [0]  # the last progress step forwarded: a rerun does not repeat steps the client saw
        lost: list[str] = []
        attempt, relayed = 0, False
        while attempt < ATTEMPTS:
            attempt += 1
            try:
                outcome = self._attempt(job, shipped, sent)
            except REPLICA_LOST as exc:
                where = job.runner or "a replica"
                lost.append(f"{where} ({type(exc).__name__})")
                if job.cancel.is_set():
                    return "cancelled", None, {"reason": job.cancel_reason}
                if attempt < ATTEMPTS:
                    log.warning("job %s: replica %s died while running it; running it again on another", job.id, where)
                job.runner = None
                continue
            if outcome is not None:
                return outcome
            if relayed:
                return _error("a replica could read the job's pixels neither from shared memory nor the object store")
            shipped, relayed = transfer.add_store(shipped, job.payload), True  # it cannot open this host's shm
            attempt -= 1  # not a failure: the same attempt again, through the object store
        message = (
            f"the pool replica running this job stopped (its process died: {lost[0]}), and so did the replica it "
            f"was run again on ({lost[-1]}); submit it again"
        )
        log.error("job %s: %s", job.id, message)
        return _error(message)

    def _attempt(self, job: Job, shipped: dict[str, Any], sent: list[int]) -> Outcome | None:
        """One call to the deployment: its final event, or None when the replica asks for the pixels
        through the object store."""
        call = self._handle.options(method_name="run", stream=True, multiplexed_model_id=routing_key(job.payload))
        response = call.remote(shipped)
        self._calls.add(job, response)
        events: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=_pump, args=(response, events), name=f"{self.name}-events", daemon=True).start()
        replica: str | None = None
        waiting = Waiting(self._book, self._replica_timeout)
        last = time.monotonic()
        try:
            while True:
                try:
                    event = events.get(timeout=TICK_S)
                except queue.Empty:
                    if replica is None and (why := waiting.gives_up()) is not None:
                        response.cancel()
                        log.error("job %s: %s", job.id, why)
                        return _error(why)
                    if replica is not None and time.monotonic() - last > SILENCE_S:
                        response.cancel()
                        raise ReplicaSilent(f"replica {replica} sent nothing for {SILENCE_S:.0f} s") from None
                    continue
                last = time.monotonic()
                if event is END:
                    raise RuntimeError("the replica's event stream ended without a result")
                if isinstance(event, BaseException):
                    raise event
                kind = event[0]
                if kind == "started":
                    replica = job.runner = event[1]["replica"]
                    self._book.started(event[1], job.id)
                elif kind == "progress":
                    _, step, total, preview = event
                    if step > sent[0]:
                        sent[0] = step
                        self._progress(job, step, total, preview)
                elif kind == "need_store":
                    self._remote.add(event[-1]["replica"])
                    self._book.finished(event[-1])
                    log.info("job %s: replica %s is on another host: pixels go through Ray's object store",
                             job.id, event[-1]["replica"])  # fmt: skip
                    return None
                else:
                    self._book.finished(event[-1])
                    outcome = self._outcome(event)
                    self._ended_by_replica = True
                    return outcome
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
        except DeploymentUnavailableError:
            why = failures.unavailable(self._book.problems())
            log.error("job %s: %s", job.id, why)
            return _error(why)
        finally:
            self._calls.remove(job)

    def _outcome(self, event: tuple) -> Outcome:
        kind = event[0]
        if kind == "result":
            return "result", {"image": transfer.receive(event[1], self.buffers)}, event[2]
        return kind, None, event[1]

    def _progress(self, job: Job, step: int, total: int, preview: transfer.Packed | None) -> None:
        images = {"preview": transfer.unpack(preview)} if preview is not None else None
        try:
            self._emit(job, "progress", images=images, step=step, total=total)
        except Exception:  # a lost progress event must not fail the job
            log.exception("job %s: a progress event could not be sent", job.id)


class Waiting:
    """How long a job has waited for a replica while none was running, and when it gives up."""

    def __init__(self, book: ReplicaBook, timeout: float) -> None:
        self._book = book
        self._timeout = timeout
        self._none_since: float | None = None

    def gives_up(self) -> str | None:
        """The job's error message once it has waited long enough with no replica running, else None."""
        now = time.monotonic()
        if self._book.running():
            self._none_since = None
            return None
        if self._none_since is None:
            self._none_since = now
        waited = now - self._none_since
        if waited >= self._timeout or (self._book.given_up() and waited >= min(GIVEN_UP_S, self._timeout)):
            return failures.no_replica(waited, self._book.problems())
        return None


def _pump(response: Any, events: queue.Queue[Any]) -> None:
    """Read a streaming call's events into ``events`` (the slot reads them with a deadline)."""
    try:
        for event in response:
            events.put(event)
        events.put(END)
    except BaseException as exc:
        events.put(exc)


def _error(message: str) -> Outcome:
    return "error", None, {"code": codes.MODEL_ERROR, "field": None, "message": message}


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
        serve_view: Callable[[], tuple[list[dict[str, Any]], dict[str, Any]]] | None = None,
        replica_timeout: float = 180.0,
        shm_tag: str | None = None,
        on_file: Callable[[str], None] | None = None,
    ) -> None:
        """``shm_tag``: the slots' shared-memory files are named with it (None: no shared memory, pixels
        go through the object store); ``on_file``: told each file's path (the reaper removes them)."""
        self._calls = InFlight()
        self._book = book
        self._serve_view = serve_view
        self._done = threading.Event()
        remote = Remote()
        self.slots = [
            ReplicaSlot(ctx, events_endpoint, queue, handle, book, self._calls, n, replica_timeout,
                        SlotBuffers(f"{shm_tag}-{n}", on_file) if shm_tag else None, remote)
            for n in range(slots)
        ]  # fmt: skip
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
        for slot in self.slots:
            if slot.buffers is not None and not slot.is_alive():
                slot.buffers.retire()

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
                self._book.refresh(*self._serve_view())
            except Exception as exc:  # the controller is busy or restarting: the next refresh catches up
                log.debug("pool: could not read the replicas' state: %s", exc)
