"""The job queue: FIFO order, queue positions, cancellation. Thread-safe, no sockets, no torch.

The I/O thread submits and cancels; the single worker thread takes jobs one at a time.
A job is keyed by (client identity, client-chosen job id), so two clients may use the same ids.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

JobKey = tuple[bytes, str]


@dataclass(eq=False)
class Job:
    client: bytes  # ZeroMQ routing identity of the client that submitted it
    id: str  # the client's job id
    payload: Any  # what the worker needs (a RefineRequest), opaque to the queue
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"

    @property
    def key(self) -> JobKey:
        return (self.client, self.id)


class QueueFull(Exception):
    pass


class JobQueue:
    def __init__(self, max_total: int = 1000) -> None:
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self.max_total = max_total

    def submit(self, job: Job) -> int:
        """Queue a job; returns its position (0 = runs next, i.e. nothing ahead of it)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("queue is closed")
            if self.has(job.key):
                raise KeyError(job.key)
            if len(self._waiting) >= self.max_total:
                raise QueueFull(f"{len(self._waiting)} jobs are already waiting; the limit is {self.max_total}")
            position = len(self._waiting) + (1 if self._running else 0)
            self._waiting.append(job)
            self._lock.notify()
            return position

    def has(self, key: JobKey) -> bool:
        with self._lock:
            return (self._running is not None and self._running.key == key) or any(j.key == key for j in self._waiting)

    def count(self, client: bytes) -> int:
        """Jobs of one client, queued or running."""
        with self._lock:
            running = 1 if self._running is not None and self._running.client == client else 0
            return running + sum(1 for j in self._waiting if j.client == client)

    def take(self, timeout: float | None = None) -> Job | None:
        """Worker: block until a job is available (returns it as running) or the queue closes (None)."""
        with self._lock:
            while not self._waiting and not self._closed:
                if not self._lock.wait(timeout):
                    return None
            if self._closed:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def done(self, job: Job) -> None:
        with self._lock:
            if self._running is job:
                self._running = None

    def cancel(self, key: JobKey, reason: str = "cancelled") -> str | None:
        """'queued' if removed from the queue, 'running' if the running job was told to stop, else None."""
        with self._lock:
            if self._running is not None and self._running.key == key:
                self._running.cancel_reason = reason
                self._running.cancel.set()
                return "running"
            for job in self._waiting:
                if job.key == key:
                    self._waiting.remove(job)
                    return "queued"
            return None

    def cancel_client(self, client: bytes, reason: str) -> list[Job]:
        """Cancel every job of one client; returns the queued jobs that were removed."""
        with self._lock:
            removed = [j for j in self._waiting if j.client == client]
            for job in removed:
                self._waiting.remove(job)
            if self._running is not None and self._running.client == client:
                self._running.cancel_reason = reason
                self._running.cancel.set()
            return removed

    def close(self, reason: str = "shutdown") -> list[Job]:
        """Stop taking jobs: cancel the running one, remove and return the waiting ones."""
        with self._lock:
            self._closed = True
            removed = list(self._waiting)
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel_reason = reason
                self._running.cancel.set()
            self._lock.notify_all()
            return removed

    @property
    def running(self) -> Job | None:
        with self._lock:
            return self._running

    def snapshot(self, client: bytes | None = None) -> tuple[Job | None, list[tuple[int, Job]]]:
        """(running job, [(position, waiting job)]), optionally only one client's jobs."""
        with self._lock:
            offset = 1 if self._running else 0
            waiting = [(i + offset, j) for i, j in enumerate(self._waiting) if client is None or j.client == client]
            running = self._running if client is None or (self._running and self._running.client == client) else None
            return running, waiting

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting) + (1 if self._running else 0)
