"""The job queue: round robin between clients, job and byte budgets, positions, cancellation.

Thread-safe, no sockets, no torch. The I/O thread submits and cancels; workers ``take()`` the next
fair job (several may run at once: a pool of GPUs takes several; the single worker takes one).

- A job belongs to an :class:`Owner`: the ZeroMQ routing id its events go to, and with CURVE the
  client's public key. Job ids are per owner, so two clients may use the same ids.
- Budgets and turns belong to an *account*: the CURVE key (one artist, however many sockets), or
  the routing id without CURVE. Each account has its own FIFO; ``take`` serves the accounts round
  robin, so a burst from one cannot starve another, and an account's own jobs keep their order.
- Bytes: a job holds its image and mask frame bytes from submit until it is done; results the I/O
  thread has sent but ZeroMQ has not yet taken off its hands are *held* bytes (``hold``/``release``).
  Both count against the account's budget and the total.
- When the total (jobs or bytes) is full, a client holding less than the biggest holder may still
  submit: the biggest holder's newest queued jobs are dropped to make room (longest queue drop).
- Each client's first job is not counted against the total job count (for up to ``first_job_extra``
  clients, the service's connection cap): however many clients hold one job each, a new client gets
  its first job in at once (its bytes still count against the byte budgets).
- A job whose pixels are still arriving (an upload, backend/service/transfers.py) is *admitted*: it
  holds its budgets from its ``submit`` on, and ``ready`` queues it once every byte is there.
- Live jobs (``submit`` with ``live``): each owner has one live lane. ``supersede`` is called before a
  new live job is queued: the owner's uploading or queued live job is removed, its running one told to stop at the
  next step boundary (reason ``superseded``), so at most one live job waits and one runs per owner.
  Other jobs keep their order; a live job queues behind its owner's earlier jobs like any other.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MiB = 1024 * 1024


@dataclass(frozen=True)
class Owner:
    routing: bytes  # ZeroMQ routing id: where the job's events go
    key: bytes = b""  # the client's CURVE public key (Z85) when CURVE is on, else b""

    @property
    def account(self) -> bytes:
        """Who budgets and turns belong to (keys and routing ids never mix: CURVE is on or off)."""
        return self.key or self.routing


JobKey = tuple[Owner, str]


@dataclass(eq=False)
class Job:
    owner: Owner
    id: str  # the client's job id
    payload: Any  # what the worker needs (a RefineRequest), opaque to the queue
    nbytes: int = 0  # pixel bytes the job holds (image and mask frames)
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"
    runner: str | None = None  # where it runs: a pool replica's id (backend/pool), None in this process
    live: bool = False  # in its owner's live lane: a newer live job supersedes it

    @property
    def client(self) -> bytes:
        """The routing id the job's events go to."""
        return self.owner.routing

    @property
    def key(self) -> JobKey:
        return (self.owner, self.id)


class QueueFull(Exception):
    """A job or byte budget is exhausted; the message says which, and the limit. ``kind``: which one
    (client_jobs, client_bytes, total_jobs, total_bytes)."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


class JobQueue:
    def __init__(
        self,
        max_total: int = 1000,
        max_per_client: int | None = None,
        max_client_bytes: int | None = None,
        max_total_bytes: int | None = None,
        first_job_extra: int = 0,
    ) -> None:
        self._lock = threading.Condition()
        self._uploading: dict[JobKey, Job] = {}  # admitted, pixels still arriving
        self._waiting: dict[bytes, deque[Job]] = {}  # account -> its queued jobs, oldest first
        self._ring: deque[bytes] = deque()  # accounts with queued jobs, in the order of their next turn
        self._running: list[Job] = []
        self._held: dict[bytes, int] = {}  # account -> bytes of results not yet taken by ZeroMQ
        self._closed = False
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.max_client_bytes = max_client_bytes
        self.max_total_bytes = max_total_bytes
        self.first_job_extra = first_job_extra

    # -- accounting (callers hold the lock) ---------------------------------------------------

    def _jobs_of(self, account: bytes) -> int:
        running = sum(1 for j in self._running if j.owner.account == account)
        uploading = sum(1 for j in self._uploading.values() if j.owner.account == account)
        return len(self._waiting.get(account, ())) + running + uploading

    def _bytes_of(self, account: bytes) -> int:
        queued = sum(j.nbytes for j in self._waiting.get(account, ()))
        running = sum(j.nbytes for j in self._running if j.owner.account == account)
        uploading = sum(j.nbytes for j in self._uploading.values() if j.owner.account == account)
        return queued + running + uploading + self._held.get(account, 0)

    def _total_jobs(self) -> int:
        return sum(len(q) for q in self._waiting.values()) + len(self._running) + len(self._uploading)

    def _total_bytes(self) -> int:
        queued = sum(j.nbytes for q in self._waiting.values() for j in q)
        uploading = sum(j.nbytes for j in self._uploading.values())
        return queued + uploading + sum(j.nbytes for j in self._running) + sum(self._held.values())

    def _accounts(self) -> set[bytes]:
        """Accounts holding a job (queued, running or uploading)."""
        out = set(self._waiting)
        out.update(j.owner.account for j in self._running)
        out.update(j.owner.account for j in self._uploading.values())
        return out

    def _order(self) -> list[Job]:
        """Queued jobs in the order ``take`` will return them (round robin over the ring)."""
        queues = [self._waiting[a] for a in self._ring]
        out: list[Job] = []
        depth = max((len(q) for q in queues), default=0)
        for i in range(depth):
            out.extend(q[i] for q in queues if i < len(q))
        return out

    def _find(self, key: JobKey) -> Job | None:
        if key in self._uploading:
            return self._uploading[key]
        for job in self._running:
            if job.key == key:
                return job
        for job in self._waiting.get(key[0].account, ()):
            if job.key == key:
                return job
        return None

    def _remove_waiting(self, job: Job) -> None:
        account = job.owner.account
        queue = self._waiting[account]
        queue.remove(job)
        if not queue:
            del self._waiting[account]
            self._ring.remove(account)

    # -- admission ----------------------------------------------------------------------------

    def _check_client(self, job: Job) -> None:
        account = job.owner.account
        jobs = self._jobs_of(account)
        if self.max_per_client is not None and jobs >= self.max_per_client:
            raise QueueFull(
                f"this client already has {jobs} jobs queued or running; the limit is {self.max_per_client}",
                "client_jobs",
            )
        held = self._bytes_of(account)
        if self.max_client_bytes is not None and held + job.nbytes > self.max_client_bytes:
            raise QueueFull(
                f"this client's queued images and undelivered results take {_mib(held)}; this job adds "
                f"{_mib(job.nbytes)} and the limit is {_mib(self.max_client_bytes)} per client: wait for "
                "its jobs to finish (and read their results)",
                "client_bytes",
            )

    def _make_room(self, job: Job) -> list[Job]:
        """The queued jobs to drop so that ``job`` fits the totals (longest queue drop); QueueFull if
        the submitting account is itself the biggest holder. Nothing is changed here."""
        total_jobs, total_bytes = self._total_jobs(), self._total_bytes()
        me = job.owner.account
        # Every client's first job is free of the job count (for up to first_job_extra clients): a client
        # with none always gets one in, however many clients hold one each.
        holders = self._accounts()
        first_free = self._jobs_of(me) == 0 and len(holders) < self.first_job_extra
        max_jobs = self.max_total + min(len(holders) + (1 if first_free else 0), self.first_job_extra)
        drop: list[Job] = []
        jobs: dict[bytes, int] = {}
        held: dict[bytes, int] = {}
        queues: dict[bytes, list[Job]] = {}
        while True:
            over_jobs = not first_free and total_jobs + 1 > max_jobs
            over_bytes = self.max_total_bytes is not None and total_bytes + job.nbytes > self.max_total_bytes
            if not (over_jobs or over_bytes):
                return drop
            if not queues:  # first time over: what every client holds, and what it could lose
                queues = {a: list(q) for a, q in self._waiting.items() if a != me}
                jobs = {a: self._jobs_of(a) for a in queues}
                held = {a: self._bytes_of(a) for a in queues}
            metric, mine = (jobs, self._jobs_of(me) + 1) if over_jobs else (held, self._bytes_of(me) + job.nbytes)
            victim = max((a for a in queues if queues[a]), key=lambda a: metric[a], default=None)
            if victim is None or metric[victim] <= mine:
                if over_jobs:
                    raise QueueFull(
                        f"the service already has {total_jobs} jobs queued or running; the limit is {self.max_total}",
                        "total_jobs",
                    )
                raise QueueFull(
                    f"the service's queued images and undelivered results take {_mib(total_bytes)}; this job adds "
                    f"{_mib(job.nbytes)} and the limit is {_mib(self.max_total_bytes or 0)} in all",
                    "total_bytes",
                )
            dropped = queues[victim].pop()
            drop.append(dropped)
            jobs[victim] -= 1
            held[victim] -= dropped.nbytes
            total_jobs -= 1
            total_bytes -= dropped.nbytes

    def submit(self, job: Job, announce: Callable[[int], None] | None = None) -> list[Job]:
        """Queue a job; returns the queued jobs of other clients dropped to make room for it.

        ``announce(position)`` (jobs that run before it; 0 = runs next) is called under the lock
        before any worker can see the job: if it raises, nothing is queued and nothing dropped.
        Raises QueueFull (a budget), KeyError (the owner already has this job id), RuntimeError (closed).
        """
        with self._lock:
            drop = self._take_in(job)
            account = job.owner.account
            touched = {account} | {victim.owner.account for victim in drop}
            saved_ring = deque(self._ring)
            saved = {a: deque(self._waiting[a]) for a in touched if a in self._waiting}
            for victim in drop:
                self._remove_waiting(victim)
            if account not in self._waiting:
                self._waiting[account] = deque()
                self._ring.append(account)
            self._waiting[account].append(job)
            if announce is not None:
                try:
                    announce(self._position(job))
                except BaseException:
                    self._ring = saved_ring
                    for a in touched:
                        if a in saved:
                            self._waiting[a] = saved[a]
                        else:
                            self._waiting.pop(a, None)
                    raise
            self._lock.notify()
            return drop

    def admit(self, job: Job) -> list[Job]:
        """Take a job whose pixels are still to arrive: its budgets are checked (and others' queued jobs
        dropped to make room, returned) as ``submit`` does; it holds them until ``ready`` or ``abort``."""
        with self._lock:
            drop = self._take_in(job)
            for victim in drop:
                self._remove_waiting(victim)
            self._uploading[job.key] = job
            return drop

    def _take_in(self, job: Job) -> list[Job]:
        """Under the lock: whether ``job`` may come in (RuntimeError: closed; KeyError: its id is taken;
        QueueFull: a budget), and the other clients' queued jobs to drop to make room for it."""
        if self._closed:
            raise RuntimeError("queue is closed")
        if self._find(job.key) is not None:
            raise KeyError(job.key)
        self._check_client(job)
        return self._make_room(job)

    def ready(self, job: Job, announce: Callable[[int], None] | None = None) -> None:
        """An admitted job's pixels are all there: queue it (no budget is checked again). KeyError if it
        is no longer admitted (cancelled meanwhile); RuntimeError when the queue is closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("queue is closed")
            if self._uploading.get(job.key) is not job:
                raise KeyError(job.key)
            account = job.owner.account
            fresh = account not in self._waiting
            if fresh:
                self._waiting[account] = deque()
                self._ring.append(account)
            self._waiting[account].append(job)
            if announce is not None:
                try:
                    announce(self._position(job))
                except BaseException:
                    self._remove_waiting(job)
                    raise
            del self._uploading[job.key]
            self._lock.notify()

    def abort(self, job: Job) -> bool:
        """Forget an admitted job (its upload failed or was cancelled); False if it was not admitted."""
        with self._lock:
            return self._uploading.pop(job.key, None) is not None

    def _position(self, job: Job) -> int:
        return len(self._running) + self._order().index(job)

    # -- workers ------------------------------------------------------------------------------

    def take(self, timeout: float | None = None) -> Job | None:
        """Worker: block until a job is available (returns it, now running) or the queue closes (None).
        Jobs come round robin over the clients with queued jobs, each client's in its own order."""
        with self._lock:
            while not self._ring and not self._closed:
                if not self._lock.wait(timeout):
                    return None
            if self._closed:
                return None
            account = self._ring.popleft()
            queue = self._waiting[account]
            job = queue.popleft()
            if queue:
                self._ring.append(account)
            else:
                del self._waiting[account]
            self._running.append(job)
            return job

    def done(self, job: Job, result_bytes: int = 0) -> None:
        """``job`` ended. Its result's ``result_bytes`` (a result's, else 0) count against its owner from this
        moment, in the same step that frees the job's own bytes: no submit slips into the gap between the
        end and the I/O thread's taking the result (``release`` them if the result is never sent)."""
        with self._lock:
            if job in self._running:
                self._running.remove(job)
            if result_bytes:
                account = job.owner.account
                self._held[account] = self._held.get(account, 0) + result_bytes

    def hold(self, account: bytes, nbytes: int) -> None:
        """Count bytes of a sent result that ZeroMQ has not taken yet against ``account``."""
        with self._lock:
            self._held[account] = self._held.get(account, 0) + nbytes

    def release(self, account: bytes, nbytes: int) -> None:
        with self._lock:
            left = self._held.get(account, 0) - nbytes
            if left > 0:
                self._held[account] = left
            else:
                self._held.pop(account, None)

    # -- cancellation -------------------------------------------------------------------------

    def cancel(self, key: JobKey, reason: str = "cancelled") -> str | None:
        """'queued' if removed from the queue, 'uploading' if an admitted job was forgotten, 'running'
        if the running job was told to stop, else None."""
        with self._lock:
            job = self._find(key)
            if job is None:
                return None
            if self._uploading.pop(key, None) is not None:
                return "uploading"
            if job in self._running:
                job.cancel_reason = reason
                job.cancel.set()
                return "running"
            self._remove_waiting(job)
            return "queued"

    def supersede(self, owner: Owner, live: bool, replaces: str | None, reason: str = "superseded") -> list[Job]:
        """Before ``owner`` queues a new job: with ``live``, every live job of ``owner``, and the job named
        ``replaces`` (any job of ``owner``), are superseded. Queued and admitted (uploading) ones are removed
        and returned (the caller tells their owner ``cancelled`` and ends the uploads); running ones are told
        to stop at their next step boundary with ``reason`` (unless already told to stop). Ids of other
        owners are never matched."""
        with self._lock:

            def hit(job: Job) -> bool:
                return job.owner == owner and ((live and job.live) or (replaces is not None and job.id == replaces))

            removed = [j for j in self._waiting.get(owner.account, ()) if hit(j)]
            for job in removed:
                self._remove_waiting(job)
            uploading = [j for j in self._uploading.values() if hit(j)]
            for job in uploading:  # the caller ends their uploads too (Job.key)
                del self._uploading[job.key]
            removed += uploading
            for job in self._running:
                if hit(job) and not job.cancel.is_set():
                    job.cancel_reason = reason
                    job.cancel.set()
            return removed

    def cancel_where(self, match: Callable[[Owner], bool], reason: str) -> list[Job]:
        """Cancel every job whose owner matches: running ones are told to stop, queued and admitted
        (uploading) ones are removed and returned."""
        with self._lock:
            removed = [j for q in self._waiting.values() for j in q if match(j.owner)]
            for job in removed:
                self._remove_waiting(job)
            uploading = [j for j in self._uploading.values() if match(j.owner)]
            for job in uploading:
                del self._uploading[job.key]
            removed += uploading
            for job in self._running:
                if match(job.owner):
                    job.cancel_reason = reason
                    job.cancel.set()
            return removed

    def close(self, reason: str = "shutdown") -> list[Job]:
        """Stop taking jobs: cancel the running ones, remove and return the waiting ones."""
        with self._lock:
            self._closed = True
            removed = self._order() + list(self._uploading.values())
            self._uploading.clear()
            self._waiting.clear()
            self._ring.clear()
            for job in self._running:
                job.cancel_reason = reason
                job.cancel.set()
            self._lock.notify_all()
            return removed

    # -- views --------------------------------------------------------------------------------

    def uploading(self, owner: Owner | None = None) -> list[Job]:
        """Admitted jobs whose pixels are still arriving (of one owner, or all)."""
        with self._lock:
            return [j for j in self._uploading.values() if owner is None or j.owner == owner]

    def has(self, key: JobKey) -> bool:
        with self._lock:
            return self._find(key) is not None

    def count(self, account: bytes) -> int:
        """Jobs of one account, queued or running."""
        with self._lock:
            return self._jobs_of(account)

    def bytes_of(self, account: bytes) -> int:
        """Bytes one account holds: its jobs' images and its undelivered results."""
        with self._lock:
            return self._bytes_of(account)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total_bytes()

    @property
    def running(self) -> list[Job]:
        with self._lock:
            return list(self._running)

    def owners(self) -> set[Owner]:
        with self._lock:
            return {j.owner for j in self._running} | {j.owner for q in self._waiting.values() for j in q}

    def snapshot(self, owner: Owner | None = None) -> tuple[list[Job], list[tuple[int, Job]]]:
        """(running jobs, [(position, queued job)] in the order they will run), optionally of one owner.
        A position counts the jobs that run before it: the running ones and the queued ones ahead."""
        with self._lock:
            offset = len(self._running)
            waiting = [(i + offset, j) for i, j in enumerate(self._order()) if owner is None or j.owner == owner]
            running = [j for j in self._running if owner is None or j.owner == owner]
            return running, waiting

    def __len__(self) -> int:
        """Jobs queued or running (not those still uploading)."""
        with self._lock:
            return sum(len(q) for q in self._waiting.values()) + len(self._running)
