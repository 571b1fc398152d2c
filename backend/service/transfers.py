"""The service's side of the pixel streams (protocol/transfer.py): uploads arriving, results leaving.

No sockets here: the service sends what these say. Budgets are the queue's: an upload's job holds
its bytes from its ``submit`` on (``JobQueue.admit``); a result's bytes are *held* for its account
(``JobQueue.hold``) until the client has acknowledged every byte, it expires, or it is dropped.

- Uploads: one per job, and one at a time per routing id (another submit meanwhile is refused), so a
  connection never has more than one window of chunks in flight. An upload with no chunk for
  ``timeout`` seconds is dropped.
- Downloads: a result is sent as its header, then chunks within the client's credit. A result the
  client has not acknowledged for ``stall`` seconds is *unread*: its client gets no new job in,
  and when the service's byte budget is full another client's job may drop it. A result not
  delivered within ``ttl`` seconds is dropped. Either way its owner is told (an ``error``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from krita_sdxl.protocol import Incoming, Outgoing, ProtocolError
from krita_sdxl.protocol import errors as codes

from .jobs import Job, JobKey, JobQueue, Owner


@dataclass(eq=False)
class Upload:
    job: Job
    incoming: Incoming
    started: float
    last_chunk: float
    granted: int = 0  # the credit sent so far: the sender may send bytes up to this offset
    seed: int = 0  # the job's seed, for its accepted event

    @property
    def owner(self) -> Owner:
        return self.job.owner


class Uploads:
    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._uploads: dict[JobKey, Upload] = {}  # in the order started

    def start(self, job: Job, incoming: Incoming, seed: int) -> Upload:
        now = self._clock()
        upload = Upload(job, incoming, now, now, seed=seed)
        self._uploads[job.key] = upload
        return upload

    def get(self, owner: Owner, job_id: str) -> Upload | None:
        return self._uploads.get((owner, job_id))

    def put(self, owner: Owner, job_id: str, offset: int, data: Any) -> Upload:
        """Store a chunk; ProtocolError for an unknown upload or a chunk out of order or beyond credit."""
        upload = self._uploads.get((owner, job_id))
        if upload is None:
            raise ProtocolError(
                codes.UNKNOWN_JOB,
                f"chunk for job {job_id!r}, which has no upload in progress (submit it first, and send its "
                "chunks after its credit)",
                "job",
                job_id,
            )
        upload.incoming.put(offset, data, upload.granted)
        upload.last_chunk = self._clock()
        return upload

    def credit(self, upload: Upload) -> tuple[int, int]:
        """The credit to send for ``upload`` now: (received, until)."""
        upload.granted = max(upload.granted, upload.incoming.until)
        return upload.incoming.received, upload.granted

    def active(self, routing: bytes) -> Upload | None:
        """The upload under way on ``routing`` (a connection uploads one job at a time)."""
        return next((u for u in self._uploads.values() if u.owner.routing == routing and not u.incoming.done), None)

    def end(self, key: JobKey) -> Upload | None:
        """Forget an upload (done, failed or cancelled)."""
        return self._uploads.pop(key, None)

    def of(self, match: Callable[[Owner], bool]) -> list[Upload]:
        return [u for u in self._uploads.values() if match(u.owner)]

    def stalled(self) -> list[Upload]:
        limit = self._clock() - self.timeout
        return [u for u in self._uploads.values() if u.last_chunk < limit]

    def __len__(self) -> int:
        return len(self._uploads)


@dataclass(eq=False)
class Download:
    owner: Owner
    job: str
    fields: dict[str, Any]  # the result event's fields (seed, elapsed, image spec)
    out: Outgoing
    created: float
    progressed: float  # created, or the client's last acknowledgement
    header_sent: bool = False
    keep: list[Any] = field(default_factory=list)  # the buffers the stream's views point into

    @property
    def nbytes(self) -> int:
        return self.out.total


class Downloads:
    def __init__(self, queue: JobQueue, ttl: float, stall: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._queue = queue
        self.ttl = ttl
        self.stall = stall
        self._clock = clock
        self._downloads: dict[JobKey, Download] = {}

    def add(self, owner: Owner, job: str, fields: dict[str, Any], buffers: list[Any]) -> Download:
        """A finished job's result, to be sent; its bytes count against the owner already (the worker's
        ``JobQueue.done``), and until it is delivered or dropped. A result for the same job replaces the old one."""
        old = self._downloads.pop((owner, job), None)
        if old is not None:
            self._queue.release(owner.account, old.nbytes)
        now = self._clock()
        out = Outgoing(job, buffers)
        out.restart()
        download = Download(owner, job, fields, out, now, now, keep=list(buffers))
        self._downloads[(owner, job)] = download
        return download

    def ack(self, owner: Owner, job: str, received: int) -> Download:
        """The client holds ``received`` bytes of the result; when that is all of it, it is delivered."""
        download = self._downloads.get((owner, job))
        if download is None:
            raise ProtocolError(
                codes.UNKNOWN_JOB, f"credit for job {job!r}, which has no result on its way", "job", job
            )
        before = download.out.acked
        download.out.ack(received)
        if download.out.acked > before:
            download.progressed = self._clock()
        if download.out.done:
            self._remove(download)
        return download

    def restart(self, owner: Owner) -> list[Download]:
        """The owner is back on a new connection: its results go again from the first byte."""
        out = []
        for download in self._downloads.values():
            if download.owner == owner:  # (still unread until the client acknowledges something)
                download.header_sent = False
                download.out.restart()
                out.append(download)
        return out

    def of(self, match: Callable[[Owner], bool]) -> list[Download]:
        return [d for d in self._downloads.values() if match(d.owner)]

    def __iter__(self) -> Iterator[Download]:
        return iter(list(self._downloads.values()))

    def unread(self, account: bytes) -> Download | None:
        """A result of ``account`` the client has not read for ``stall`` seconds, if any."""
        limit = self._clock() - self.stall
        return next((d for d in self._downloads.values() if d.owner.account == account and d.progressed < limit), None)

    def expired(self) -> list[Download]:
        """Results older than ``ttl``: removed (their bytes released) and returned."""
        limit = self._clock() - self.ttl
        gone = [d for d in self._downloads.values() if d.created < limit]
        for download in gone:
            self._remove(download)
        return gone

    def drop_unread(self, need: int, spare: bytes) -> list[Download]:
        """Drop unread results (never ``spare``'s), the biggest holder's oldest first, until ``need``
        bytes are free in the queue's total; returns those dropped (none if that cannot free enough)."""
        limit = self._clock() - self.stall
        candidates = [d for d in self._downloads.values() if d.progressed < limit and d.owner.account != spare]
        total = self._queue.max_total_bytes
        if total is None or not candidates:
            return []
        free = total - self._queue.total_bytes
        if free + sum(d.nbytes for d in candidates) < need:
            return []
        held: dict[bytes, int] = {}
        for d in candidates:
            held[d.owner.account] = self._queue.bytes_of(d.owner.account)
        candidates.sort(key=lambda d: (-held[d.owner.account], d.created))
        dropped = []
        for download in candidates:
            if free >= need:
                break
            self._remove(download)
            free += download.nbytes
            dropped.append(download)
        return dropped

    def drop(self, match: Callable[[Owner], bool]) -> list[Download]:
        gone = [d for d in self._downloads.values() if match(d.owner)]
        for download in gone:
            self._remove(download)
        return gone

    def _remove(self, download: Download) -> None:
        if self._downloads.pop((download.owner, download.job), None) is download:
            self._queue.release(download.owner.account, download.nbytes)

    @property
    def pending_bytes(self) -> int:
        return sum(d.nbytes for d in self._downloads.values())

    def __len__(self) -> int:
        return len(self._downloads)
