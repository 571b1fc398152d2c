"""The ZeroMQ service: a ROUTER socket on the I/O thread, a worker thread behind a fair queue.

Pattern: ROUTER (service) / DEALER (clients). Every request is validated by the protocol codec
before any work starts; a bad message gets an ``error`` event and the service keeps serving: no
message, and no exception anywhere in the I/O loop, stops it. Events from the worker arrive on an
inproc PULL socket and are sent to the client that owns the job, only while that client's own
connection holds its routing id (backend/service/sessions.py, connections.py). Pixels travel in
chunks under credit (protocol/transfer.py; backend/service/transfers.py).

Everything a peer can make the service hold is bounded: one frame by ``ZMQ_MAXMSGSIZE`` (1 MiB),
the unread input of a TCP connection by the intake guard (intake.py), connections by a cap
(connections.py), queued and uploading jobs and undelivered results by the queue's budgets (jobs.py).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any, cast

import zmq

from krita_sdxl.backend.common.fdlimit import connection_cap, raise_open_files_limit
from krita_sdxl.backend.common.logtext import escaped, short_id
from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.setup.plan import VERSION
from krita_sdxl.protocol import (
    CLIENT,
    MAX_CHUNK_BYTES,
    PROTOCOL_VERSION,
    SERVICE,
    WINDOW_BYTES,
    Incoming,
    Message,
    ProtocolError,
    decode,
    encode,
)
from krita_sdxl.protocol import errors as codes
from krita_sdxl.protocol.codec import (
    MAX_CLIENT_FRAMES,
    decode_header,
    error_event,
    error_fields,
    peek_job,
    stream_specs,
)
from krita_sdxl.protocol.endpoint import EndpointError, check_ipc_bind, parse_endpoint

from .authorized import AuthorizedKeys
from .connections import Connections, shutdown
from .deliveries import Deliveries
from .intake import IntakeGuard
from .jobs import Job, JobQueue, Owner, QueueFull
from .limits import Limits
from .peers import Peers
from .ratelog import RateLimitedLog
from .security import CurveConfig, SecurityError, apply_curve, check_exposure
from .sessions import Sessions, routing_id_problem
from .transfers import Download, Downloads, Upload, Uploads
from .worker import Described, Worker, WorkerFactory
from .zap import ZapHandler, split_user_id

log = logging.getLogger(__name__)

EVENTS_ENDPOINT = "inproc://krita-sdxl-events"
# ZMTP heartbeats on the ROUTER: a peer that stops answering pings is dropped after a few seconds,
# which frees its routing id for the same client reconnecting (ROUTER_HANDOVER is off).
ZMTP_HEARTBEAT_IVL_MS = 1000
ZMTP_HEARTBEAT_TIMEOUT_MS = 3000
ZMTP_HEARTBEAT_TTL_MS = 5000
HOUSEKEEPING_S = 0.2  # vanished clients, undelivered results, stalled uploads, keys, idle connections
PREVIEW_BACKLOG_BYTES = 8 * 1024 * 1024  # previews a client has not taken yet: beyond it, progress without one
OUTBOX_PER_OWNER = 64  # final events kept for a client whose connection is gone (it may come back)


class EndpointRefused(SecurityError, EndpointError):
    """The endpoint cannot be listened on (e.g. a live or foreign ipc socket); the message says why."""


class Service:
    """Owns the sockets, the queue and the worker. ``serve_forever`` runs until ``stop()``."""

    def __init__(
        self,
        engine: Described,
        endpoint: str,
        ctx: zmq.Context | None = None,
        limits: Limits | None = None,
        heartbeat_timeout: float = 10.0,
        curve: CurveConfig | None = None,
        insecure: bool = False,
        server_name: str = "krita-sdxl",
        warm_up: bool = False,
        worker: WorkerFactory | None = None,
        admin_keys: Path | None = None,
    ) -> None:
        """``warm_up``: the worker runs ``engine.warm_up`` before its first job (the speed path compiles
        while clients can already connect; their jobs queue behind it). ``worker``: what runs the jobs
        instead of the one worker thread, called as ``Worker`` is (the Ray pool: backend/pool).
        ``admin_keys``: a folder of client public keys that may ``unload`` from another machine."""
        check_exposure(endpoint, curve, insecure)
        try:
            where = parse_endpoint(endpoint, bind=True)
            check_ipc_bind(where)  # libzmq would silently unlink a live socket: another service's
        except EndpointError as exc:
            raise EndpointRefused(str(exc)) from None
        self.engine = engine
        self.ctx = ctx or zmq.Context.instance()
        self.limits = limits or Limits()
        self.queue = JobQueue(**self.limits.queue_budgets())
        self.peers = Peers(heartbeat_timeout)
        self.sessions = Sessions()
        self.deliveries = Deliveries(self.queue)
        self.uploads = Uploads(self.limits.upload_timeout)
        self.downloads = Downloads(self.queue, self.limits.result_ttl, stall=heartbeat_timeout)
        self.server_name = server_name
        self._local_only = where.scheme in ("ipc", "inproc")
        self._admins = AuthorizedKeys(admin_keys) if admin_keys is not None else None
        self._outbox: dict[Owner, list[tuple[float, list[Any]]]] = {}
        self._stop = threading.Event()
        self.failure: str | None = None  # why the service had to stop (fail()), if it did
        self._rejected = RateLimitedLog(log)
        files = raise_open_files_limit()
        self.max_connections = connection_cap(self.limits.max_connections, files)
        self._keys = AuthorizedKeys(curve.authorized_keys) if curve else None
        if self._keys is not None:
            self._keys.reload()
        self._router = self.ctx.socket(zmq.ROUTER)
        self._zap: ZapHandler | None = None
        self.guard: IntakeGuard | None = None
        try:
            if curve is not None and self._keys is not None:
                self._zap = ZapHandler(self.ctx, self._keys, self._issue_token)  # before any handshake
                apply_curve(self._router, curve)
            self._router.setsockopt(zmq.LINGER, 1000)
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 0)  # a live client's id cannot be taken over
            self._router.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_IVL_MS)
            self._router.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_HEARTBEAT_TIMEOUT_MS)
            self._router.setsockopt(zmq.HEARTBEAT_TTL, ZMTP_HEARTBEAT_TTL_MS)
            self._router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
            self._router.setsockopt(zmq.HANDSHAKE_IVL, int(self.limits.hello_grace * 1000))
            if where.scheme == "tcp":
                self.guard = IntakeGuard(self.limits.intake_budget, curve is not None, self._cut)
            self.connections = Connections(self._router, self.max_connections, self.limits.hello_grace, self.guard)
            self._router.bind(where.text)
        except BaseException:
            self._router.close(linger=0)
            if self._zap is not None:
                self._zap.close()
            raise
        self.endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.connections.listening_on(self.endpoint)
        self._events = self.ctx.socket(zmq.PULL)
        self._events.bind(EVENTS_ENDPOINT + "-" + secrets.token_hex(4))
        warm = getattr(engine, "warm_up", None) if warm_up else None
        factory = cast(WorkerFactory, worker or Worker)  # Worker needs an engine that refines; the pool's does not
        self._worker = factory(
            self.ctx,
            self._events.getsockopt_string(zmq.LAST_ENDPOINT),
            self.queue,
            engine,
            warm_up=(lambda: warm(should_stop=self._stop.is_set)) if warm is not None else None,
        )
        self._capabilities = dict(engine.describe())
        self._capabilities["protocol_version"] = PROTOCOL_VERSION
        self._capabilities["backend_version"] = VERSION  # the plugin says "Update the backend" when it differs
        self._capabilities["limits"] = self.limits.describe()  # clients check a job against them before sending
        self._capabilities["transfer"] = {
            "chunk_bytes": MAX_CHUNK_BYTES,
            "window_bytes": WINDOW_BYTES,
            "upload_timeout": self.limits.upload_timeout,
            "result_ttl": self.limits.result_ttl,
        }
        self._next_housekeeping = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish (safe from signal handlers and other threads)."""
        self._stop.set()

    def fail(self, message: str) -> None:
        """Stop because what runs the jobs is gone (the GPU pool's Ray; safe from other threads): every
        live job, running or queued, ends with ``model_error`` and ``message``; ``failure`` keeps it."""
        self.failure = message
        self._stop.set()

    def serve_forever(self, poll_ms: int = 100) -> None:
        self._worker.start()
        if self.guard is not None:
            if self.guard.available:
                self.guard.start()
            else:
                log.warning("no TCP_INFO on this system: a peer's unread input is bounded only by libzmq")
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        poller.register(self.connections.monitor, zmq.POLLIN)
        if self._zap is not None:
            poller.register(self._zap.socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    self._tick(poller, poll_ms)
                except zmq.ContextTerminated:
                    break
                except Exception:  # never let anything stop the service; say what happened
                    log.exception("internal error in the service's I/O loop; serving on")
                    time.sleep(0.05)
        finally:
            self._shutdown()

    def _tick(self, poller: zmq.Poller, poll_ms: int) -> None:
        ready = dict(poller.poll(poll_ms))
        self._sync()
        if self._zap is not None and self._zap.socket in ready:
            self._zap.handle()
        if self._events in ready:
            self._forward_events()
        if self._router in ready:
            self._drain_requests()
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_S
            self.deliveries.poll()
            self._drop_vanished_clients()
            self._reload_authorized_keys()
            self._drop_stalled_uploads()
            self._expire_results()
            self.connections.housekeeping()

    def _shutdown(self) -> None:
        running = self.queue.running
        queued = self.queue.close(reason="shutdown")
        for job in queued:
            self.uploads.end(job.key)
        if self.failure is None:
            log.info("stopping: cancelling the running job and %d queued job(s)", len(queued))
            for job in queued:
                self._to_owner(job.owner, "cancelled", job=job.id, reason="shutdown")
        else:  # the running jobs' own ends will never come: they end here
            log.error("stopping: %s; %d live job(s) end with model_error", self.failure, len(running) + len(queued))
            for job in [*running, *queued]:
                self._to_owner(job.owner, "error", **error_event(job.id, codes.MODEL_ERROR, self.failure))
        self._worker.join(timeout=30 if self.failure is None else 2)
        if self.failure is None:
            self._forward_events()  # the running job's "cancelled"
        if self.guard is not None:
            self.guard.stop()
        self._events.close(linger=0)
        self._router.disable_monitor()
        self.connections.monitor.close(linger=0)
        self._router.close(linger=1000)
        if self._zap is not None:
            self._zap.close()
        log.info("stopped")

    # -- connections ----------------------------------------------------------------------------

    def _sync(self) -> None:
        """Connection events first: a closed connection's routing ids get nothing from now on."""
        for fd in self.connections.drain():
            self.sessions.closed(fd)

    def _issue_token(self) -> int:
        self._sync()
        return self.connections.issue_token()

    def _cut(self, fd: int) -> bool:
        """The intake guard's way to close a connection (from its own thread)."""
        return shutdown(fd, self.connections.local)

    def _reload_authorized_keys(self) -> None:
        """Keys added with `krita-sdxl authorize` take effect without a restart; a removed key (or a
        deleted folder) ends its clients' sessions: their jobs are cancelled and they get nothing more.
        A folder that cannot be read for lack of resources changes nothing (authorized.py)."""
        if self._keys is None:
            return
        removed = self._keys.reload()
        if not removed:
            return

        def gone(owner: Owner) -> bool:
            return owner.key in removed

        cancelled = self.queue.cancel_where(gone, reason="unauthorized")
        for job in cancelled:
            self.uploads.end(job.key)
        self.downloads.drop(gone)
        for owner in [o for o in self._outbox if gone(o)]:
            del self._outbox[owner]
        for routing in self.sessions.routings_of(removed):
            self.sessions.forget(routing)
            self.peers.forget(routing)
        log.warning("ended the sessions of %d removed key(s); %d queued job(s) dropped", len(removed), len(cancelled))

    def _drop_vanished_clients(self) -> None:
        for client in self.peers.expired():
            self.sessions.forget(client)
            removed = self.queue.cancel_where(lambda owner, c=client: owner.routing == c, reason="client_lost")
            for job in removed:  # kept for the client should it come back, or dropped when it expires
                self.uploads.end(job.key)
                self._to_owner(job.owner, "cancelled", job=job.id, reason="client_lost")
            if removed or any(j.client == client for j in self.queue.running):
                log.warning(
                    "client %s vanished (no heartbeat for %.0f s): cancelled its %d queued job(s) and "
                    "its running job, if any",
                    short_id(client),
                    self.peers.timeout,
                    len(removed),
                )

    # -- sending --------------------------------------------------------------------------------

    def _may_send(self, owner: Owner) -> bool:
        if self._keys is not None and owner.key not in self._keys:
            return False  # a removed key: its client gets nothing more
        return self.sessions.may_send(owner)

    def _send_raw(self, client: bytes, frames: list[Any]) -> None:
        self._router.send_multipart([client, *frames], copy=False)

    def _to_owner(self, owner: Owner, msg_type: str, images: dict | None = None, **fields: Any) -> bool:
        """An event for ``owner``, sent only while its own connection holds its routing id. The end of
        a job (error, cancelled) is kept for it meanwhile; anything else is dropped."""
        frames = encode(SERVICE, msg_type, images=images, **fields)
        self._sync()
        if self._may_send(owner):
            self._send_raw(owner.routing, frames)
            return True
        if msg_type in ("error", "cancelled") and fields.get("job") is not None:
            self._keep(owner, frames)
        return False

    def _keep(self, owner: Owner, frames: list[Any]) -> None:
        kept = self._outbox.setdefault(owner, [])
        kept.append((time.monotonic(), frames))
        del kept[:-OUTBOX_PER_OWNER]

    def _resume(self, owner: Owner) -> None:
        """``owner`` is back on a live connection: what was kept for it goes now."""
        for _, frames in self._outbox.pop(owner, []):
            self._send_raw(owner.routing, frames)
        for download in self.downloads.restart(owner):
            self._pump(download)
        for upload in self.uploads.of(lambda o: o == owner):
            self._grant(upload)  # chunks in flight on the old connection are lost: go on from here

    def _error_to(self, owner: Owner, job: Any, code: str, message: str, field: Any = None) -> None:
        """Never raises: every echoed text is clipped, so the event always encodes."""
        try:
            self._to_owner(owner, "error", **error_event(job, code, message, field))
        except Exception:
            log.exception("could not send an error event to %s", short_id(owner.routing))

    def _take_result(self, owner: Owner, header: zmq.Frame, rest: list[zmq.Frame]) -> None:
        """A job's result: its bytes have counted against the owner since the job ended (worker.result_bytes);
        they go on counting while it is delivered, or are freed here when it never will be."""
        buffers = [f.buffer for f in rest]
        download = None
        try:
            if self._keys is None or owner.key in self._keys:  # a removed key: nothing more, not even kept
                msg = decode(SERVICE, [header])
                download = self.downloads.add(owner, msg.job or "", msg.fields, buffers)
        finally:
            if download is None:
                self.queue.release(owner.account, sum(memoryview(b).nbytes for b in buffers))
        if download is not None:
            self._pump(download)

    def _refuse(self, client: bytes, job: Any, code: str, message: str) -> None:
        """An error to whoever holds ``client`` now (a refusal that gives away nothing)."""
        try:
            self._send_raw(client, encode(SERVICE, "error", **error_event(job, code, message)))
        except Exception:
            log.exception("could not send an error event to %s", short_id(client))

    def _forward_events(self) -> None:
        """Worker events, [routing id, key, header, *frames], to the job's owner."""
        while True:
            try:
                frames = self._events.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._forward(Owner(frames[0].bytes, frames[1].bytes), frames[2], frames[3:])
            except Exception:
                log.exception("could not forward an event from the worker")

    def _forward(self, owner: Owner, header: zmq.Frame, rest: list[zmq.Frame]) -> None:
        kind = decode_header(header).get("type")
        if kind == "result":
            self._take_result(owner, header, rest)
            return
        if self._keys is not None and owner.key not in self._keys:
            return  # a removed key: nothing more, not even kept
        if kind == "progress":
            self._sync()
            if not self._may_send(owner):
                return
            if rest and self.deliveries.pending_of(owner.account) > PREVIEW_BACKLOG_BYTES:
                fields = dict(decode(SERVICE, [header, *rest]).fields, preview=None)
                self._send_raw(owner.routing, encode(SERVICE, "progress", **fields))
                return
            images = self.deliveries.wrap(owner.account, rest) if rest else []
            self._send_raw(owner.routing, [header, *images])
            return
        self._sync()
        if self._may_send(owner):
            self._send_raw(owner.routing, [header, *rest])
        elif kind in ("error", "cancelled"):
            self._keep(owner, [header, *rest])

    def _pump(self, download: Download) -> None:
        """Send what the client's credit allows of a result (its header first)."""
        self._sync()
        if not self._may_send(download.owner):
            return
        if not download.header_sent:
            fields = dict(download.fields)
            self._send_raw(download.owner.routing, encode(SERVICE, "result", **fields))
            download.header_sent = True
        for offset, data in download.out.chunks():
            frames = encode(SERVICE, "chunk", payload=data, job=download.job, offset=offset)
            self._send_raw(download.owner.routing, frames)

    # -- receiving ------------------------------------------------------------------------------

    def _recv_bounded(self) -> tuple[list[zmq.Frame], int, list[int]] | None:
        """One message as [routing id, up to MAX_CLIENT_FRAMES frames], how many frames beyond that
        were read and dropped, and the sizes of all its frames; None when nothing is waiting."""
        try:
            first = self._router.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        frames, extra, sizes, more = [first], 0, [], first.more
        while more:  # the rest of a multipart message is already there
            part = self._router.recv(copy=False)
            more = part.more
            sizes.append(part.buffer.nbytes)
            if len(frames) <= MAX_CLIENT_FRAMES:
                frames.append(part)
            else:
                extra += 1
        return frames, extra, sizes

    def _drain_requests(self) -> None:
        for _ in range(1000):  # bounded, so worker events are not starved by a flood
            got = self._recv_bounded()
            if got is None:
                return
            try:
                self._on_frames(*got)
            except Exception:
                log.exception("internal error while handling a message")

    def _user_id(self, frame: zmq.Frame) -> bytes:
        """The ZAP handler's User-Id for this message's connection: the CURVE key and a token."""
        try:
            uid = frame.get("User-Id")
        except zmq.ZMQError:
            return b""
        return uid.encode("ascii", "replace") if isinstance(uid, str) else bytes(uid)

    def _is_local(self, frame: zmq.Frame) -> bool:
        """The message came from this machine: an ipc service, or a loopback TCP peer."""
        if self._local_only:
            return True
        try:
            address = ipaddress.ip_address(str(frame.get("Peer-Address")).strip("[]"))
        except (zmq.ZMQError, ValueError):
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))

    def _on_frames(self, frames: list[zmq.Frame], extra: int, sizes: list[int]) -> None:
        client = frames[0].bytes
        if len(frames) < 2:
            return
        header = frames[1]
        try:
            fd = int(header.get(zmq.SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            fd = -1
        key, token = split_user_id(self._user_id(header)) if self._keys is not None else (b"", None)
        self._sync()
        alive = self.connections.message(fd, token, sizes)
        problem = routing_id_problem(client)
        if problem is not None:
            self._rejected.warning("refused a message from a predictable routing id (%d bytes)", len(client))
            self._refuse(client, peek_job(header), codes.BAD_IDENTITY, problem)
            return
        if self._keys is not None:
            if key not in self._keys:  # authorized a moment ago (the handshake looked it up on disk)?
                self._reload_authorized_keys()
            if key not in self._keys:  # its key was removed while it was connected: nothing more
                self._rejected.warning("dropped a message from a client whose key is no longer authorized")
                return
        taken, back = self.sessions.bind(client, key, fd, alive)
        if taken is not None:
            self._rejected.warning(
                "refused %s: routing id %s belongs to another key; closing its connection",
                escaped(key.decode("ascii", "replace"), 60),
                short_id(client),
            )
            self._refuse(client, peek_job(header), codes.BAD_IDENTITY, taken)
            if alive:
                self.connections.close_soon(fd)  # the id's owner may want it back
            return
        owner = Owner(client, key)
        if alive:
            self.peers.seen(client)
        if back:
            self._resume(owner)
        try:
            if extra:
                raise ProtocolError(
                    codes.FRAME_MISMATCH,
                    f"a message has at most {MAX_CLIENT_FRAMES} frames (a header and one chunk); "
                    f"this one has {len(frames) - 1 + extra}",
                    None,
                    peek_job(header),
                )
            msg = decode(CLIENT, frames[1:])
            if msg.type == "unload":
                self._on_unload(owner, msg, self._is_local(header))
            else:
                getattr(self, "_on_" + msg.type)(owner, msg)
        except ProtocolError as err:
            self._rejected.warning(
                "rejected a message from %s: %s: %s", short_id(client), err.code, escaped(err.message)
            )
            if err.job is not None and _peek_type(header) == "chunk" and self.uploads.get(owner, err.job):
                self._end_upload(owner, err.job)  # a broken chunk breaks its stream: this error ends the job
            self._error_to(owner, **error_fields(err))
        except Exception as exc:  # never let one message stop the service
            log.exception("internal error while handling a message")
            self._error_to(owner, peek_job(header), codes.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    # -- requests -----------------------------------------------------------------------------

    def _on_hello(self, owner: Owner, msg: Message) -> None:
        log.info("hello from %s (%s)", short_id(owner.routing), escaped(msg["client"] or "unnamed client"))
        caps = dict(self._capabilities)
        caps.update(self._live_memory())
        self._to_owner(owner, "welcome", server=self.server_name, capabilities=caps)

    def _live_memory(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("memory", "live_capabilities"):  # live_capabilities: loaded models, memory mode
            live = getattr(self.engine, name, None)
            if callable(live):
                out.update(cast(dict[str, Any], live()))
        return out

    def _on_heartbeat(self, owner: Owner, msg: Message) -> None:
        self._to_owner(owner, "heartbeat")

    def _on_submit(self, owner: Owner, msg: Message) -> None:
        """Check everything the header says, reserve the job's budgets, then credit its upload."""
        job_id = msg["job"]
        modes = self._capabilities.get("modes", ["refine"])
        if msg["mode"] not in modes:
            raise ProtocolError(
                codes.UNSUPPORTED,
                f"mode {msg['mode']!r} is not supported by this service; supported: {', '.join(modes)}",
                "mode",
                job_id,
            )
        if self.queue.has((owner, job_id)):
            raise ProtocolError(
                codes.DUPLICATE_JOB,
                f"job {job_id!r} is already uploading, queued or running; that job goes on",
                "job",
                job_id,
            )
        check_images(msg)
        check_upscale(msg, self._capabilities)
        self.limits.check_submit(msg)
        unread = self.downloads.unread(owner.account)
        if unread is not None:
            raise ProtocolError(
                codes.LIMIT,
                f"the result of job {unread.job!r} has not been read for {self.downloads.stall:.0f} s: read it "
                f"(or it is dropped after {self.limits.result_ttl:.0f} s) before submitting more",
                None,
                job_id,
            )
        busy = self.uploads.active(owner.routing)
        if busy is not None and not _supersedes(msg, busy.job):
            raise ProtocolError(
                codes.LIMIT,
                f"job {busy.job.id!r} is still uploading on this connection: one upload at a time (send its "
                "chunks, or cancel it, then submit again)",
                None,
                job_id,
            )
        seed = msg["seed"] if msg["seed"] is not None else secrets.randbelow(2**32)
        incoming = Incoming(job_id, stream_specs(msg))
        msg.images = incoming.images()  # filled as the chunks arrive; nothing reads it before then
        try:  # plan (and refuse impossible step counts) before anything is reserved
            request = RefineRequest.from_message(msg, seed, getattr(self.engine, "timesteps", None))
        except ProtocolError as err:
            err.job = job_id
            raise
        self._supersede(owner, msg)
        job = Job(owner, job_id, request, nbytes=incoming.total, live=msg["live"])
        dropped = self._admit(job)
        for victim in dropped:
            log.warning("queue full: dropped a job of %s for %s", short_id(victim.client), short_id(owner.routing))
            self._error_to(
                victim.owner,
                victim.id,
                codes.LIMIT,
                "dropped from the queue to make room for another client's job: the queue is full and this "
                "client held the most of it. Submit fewer jobs at once",
            )
        upload = self.uploads.start(job, incoming, seed)
        self._grant(upload)

    def _admit(self, job: Job) -> list[Job]:
        """The queue's admission; when the byte total is full, unread results of bigger holders make room."""
        for attempt in (1, 2):
            try:
                return self.queue.admit(job)
            except QueueFull as exc:
                if attempt == 1 and exc.kind == "total_bytes":
                    freed = self.downloads.drop_unread(job.nbytes, spare=job.owner.account)
                    for download in freed:
                        self._error_to(
                            download.owner,
                            download.job,
                            codes.LIMIT,
                            f"the result of job {download.job!r} was not read for {self.downloads.stall:.0f} s "
                            "and was dropped to make room for another client's job",
                        )
                    if freed:
                        continue
                raise ProtocolError(codes.LIMIT, str(exc), None, job.id) from None
            except KeyError:
                raise ProtocolError(
                    codes.DUPLICATE_JOB, f"job {job.id!r} is already uploading, queued or running", "job", job.id
                ) from None
            except RuntimeError:
                raise ProtocolError(codes.SHUTTING_DOWN, "the service is shutting down", None, job.id) from None
        raise AssertionError("unreachable")

    def _grant(self, upload: Upload) -> None:
        """Send ``upload``'s credit (the answer to its submit and to each chunk but the last)."""
        received, until = self.uploads.credit(upload)
        self._to_owner(upload.owner, "credit", job=upload.job.id, received=received, until=until)

    def _on_chunk(self, owner: Owner, msg: Message) -> None:
        job_id = msg["job"]
        try:
            upload = self.uploads.put(owner, job_id, msg["offset"], msg.payload)
        except ProtocolError as err:
            if err.code != codes.UNKNOWN_JOB:  # the upload is over: this error ends the job
                self._end_upload(owner, job_id)
            raise
        if upload.incoming.done:
            self._finish_upload(upload)
        else:
            self._grant(upload)

    def _end_upload(self, owner: Owner, job_id: str) -> None:
        upload = self.uploads.end((owner, job_id))
        if upload is not None:
            self.queue.abort(upload.job)

    def _finish_upload(self, upload: Upload) -> None:
        """Every byte is there: queue the job (``accepted``)."""
        job, owner = upload.job, upload.owner
        self.uploads.end(job.key)
        request = job.payload

        def announce(position: int) -> None:  # under the queue's lock: no worker sees the job before this
            self._to_owner(
                owner,
                "accepted",
                job=job.id,
                position=position,
                seed=upload.seed,
                steps=request.plan.steps,
                denoise_steps=request.plan.denoise_steps,
            )

        try:
            self.queue.ready(job, announce)
        except KeyError:
            pass  # cancelled while its last chunk was on its way
        except RuntimeError:
            self._error_to(owner, job.id, codes.SHUTTING_DOWN, "the service is shutting down")

    def _supersede(self, owner: Owner, msg: Message) -> None:
        """A ``live`` submit (or one that names the job it ``replaces``) supersedes: the older job, if
        still queued, ends now with ``cancelled`` (reason ``superseded``); if running, the worker stops
        it at its next step boundary and sends the same. Called once the new job has passed every check."""
        if not msg["live"] and msg["replaces"] is None:
            return
        for old in self.queue.supersede(owner, msg["live"], msg["replaces"]):
            self.uploads.end(old.key)  # when it was still uploading
            log.info("job %s superseded by %s", escaped(old.id, 80), escaped(msg["job"], 80))
            self._to_owner(old.owner, "cancelled", job=old.id, reason="superseded")

    def _on_credit(self, owner: Owner, msg: Message) -> None:
        """The client holds ``received`` bytes of a result: send more, or forget it once it has all."""
        download = self.downloads.ack(owner, msg["job"], msg["received"])
        if not download.out.done:
            self._pump(download)

    def _on_unload(self, owner: Owner, msg: Message, local: bool) -> None:
        """Free a model; a running job keeps it until it ends, a later job that needs it loads it again.
        Only a client on this machine, or one whose key is an admin key, may."""
        model = msg["model"]
        if not (local or self._is_admin(owner)):
            raise ProtocolError(
                codes.FORBIDDEN,
                "only a client on the service's machine (loopback or ipc), or one with an admin key "
                "(serve --admin-keys), may unload models: they are shared by every client",
                "model",
            )
        unload = getattr(self.engine, "unload", None)
        if unload is None:
            raise ProtocolError(codes.UNSUPPORTED, "this service cannot unload models", "model")
        was_loaded, deferred = unload(model)
        log.info("unload %s: was loaded %s%s", model, was_loaded, ", after the running job" if deferred else "")
        self._to_owner(owner, "unloaded", model=model, was_loaded=was_loaded, deferred=deferred)

    def _is_admin(self, owner: Owner) -> bool:
        if self._admins is None or not owner.key:
            return False
        self._admins.reload()
        return owner.key in self._admins

    def _on_cancel(self, owner: Owner, msg: Message) -> None:
        job_id = msg["job"]
        where = self.queue.cancel((owner, job_id))
        if where in ("queued", "uploading"):
            if where == "uploading":
                self.uploads.end((owner, job_id))
            self._to_owner(owner, "cancelled", job=job_id, reason="cancelled")
        elif where is None:
            raise ProtocolError(
                codes.UNKNOWN_JOB, f"no uploading, queued or running job {job_id!r} for this client", "job", job_id
            )
        # running: the worker stops at the next step and sends "cancelled" itself

    def _on_status(self, owner: Owner, msg: Message) -> None:
        running, waiting = self.queue.snapshot(owner)
        jobs = [{"job": j.id, "state": "running", "position": 0, **_where(j)} for j in running]
        jobs += [{"job": j.id, "state": "queued", "position": p} for p, j in waiting]
        ahead = len(self.queue)
        for upload in self.uploads.of(lambda o: o == owner):
            jobs.append(
                {
                    "job": upload.job.id,
                    "state": "uploading",
                    "position": ahead,
                    "received": upload.incoming.received,
                    "total": upload.incoming.total,
                }
            )
        if msg["job"] is not None:
            jobs = [j for j in jobs if j["job"] == msg["job"]]
        self._to_owner(
            owner,
            "status",
            running=running[0].id if running else None,
            jobs=jobs,
            queue_length=len(self.queue),
        )

    # -- housekeeping ---------------------------------------------------------------------------

    def _drop_stalled_uploads(self) -> None:
        for upload in self.uploads.stalled():
            self._end_upload(upload.owner, upload.job.id)
            self._error_to(
                upload.owner,
                upload.job.id,
                codes.LIMIT,
                f"no chunk of job {upload.job.id!r} arrived for {self.uploads.timeout:.0f} s: its upload was "
                f"dropped after {upload.incoming.received} of {upload.incoming.total} bytes; submit it again",
            )

    def _expire_results(self) -> None:
        for download in self.downloads.expired():
            self._error_to(
                download.owner,
                download.job,
                codes.LIMIT,
                f"the result of job {download.job!r} was not read within {self.downloads.ttl:.0f} s and was dropped",
            )
        limit = time.monotonic() - self.limits.result_ttl
        for owner in list(self._outbox):
            kept = [(t, f) for t, f in self._outbox[owner] if t >= limit]
            if kept:
                self._outbox[owner] = kept
            else:
                del self._outbox[owner]


def _peek_type(frame: Any) -> Any:
    try:
        return decode_header(frame).get("type")
    except ProtocolError:
        return None


def _where(job: Job) -> dict[str, str]:
    """A running job's ``replica`` (the pool's replica that runs it) for ``status``; none in one process."""
    return {"replica": job.runner} if job.runner else {}


def check_upscale(msg: Message, capabilities: dict[str, Any]) -> None:
    """An upscale job needs a service that upscales, and ``method`` model one with an upscaler model."""
    spec = msg.fields.get("upscale")
    if spec is None:
        return
    offered = capabilities.get("upscale")
    if not isinstance(offered, dict):
        raise ProtocolError(codes.UNSUPPORTED, "this service cannot upscale", "upscale", msg.job)
    if spec.method not in offered.get("methods", []):
        raise ProtocolError(
            codes.UNSUPPORTED,
            f"upscale.method {spec.method} is not available here: this service has no upscaler model (its operator "
            "starts it with --upscaler FILE); use method lanczos or auto",
            "upscale.method",
            msg.job,
        )


def check_images(msg: Message) -> None:
    """The submit's image and mask fit together (formats and sizes the codec cannot judge alone)."""
    job_id = msg["job"]
    mask = msg.fields.get("mask")
    image = msg.fields["image"]
    if mask is not None:
        if mask.order != "L":
            raise ProtocolError(
                codes.BAD_FIELD,
                f"mask must be a one-channel image (order L), got order {mask.order}",
                "mask.order",
                job_id,
            )
        if mask.sample != "uint":
            raise ProtocolError(
                codes.BAD_FIELD,
                f"mask must hold unsigned integer samples (sample uint, 8 or 16 bit), got {mask.depth}-bit "
                f"{mask.sample}",
                "mask.sample",
                job_id,
            )
        if (mask.width, mask.height) != (image.width, image.height):
            raise ProtocolError(
                codes.BAD_FIELD,
                f"mask is {mask.width}x{mask.height} but image is {image.width}x{image.height}; they must match",
                "mask",
                job_id,
            )
    if image.order == "L":
        raise ProtocolError(
            codes.BAD_FIELD, "image must have colour channels (RGBA, BGRA, RGB or BGR)", "image.order", job_id
        )
    if (msg["work_width"] is None) != (msg["work_height"] is None):
        raise ProtocolError(codes.BAD_FIELD, "work_width and work_height must be given together", "work_width", job_id)


def _supersedes(msg: Message, older: Job) -> bool:
    """Whether the submit ``msg`` supersedes ``older`` (a job of the same client): a live submit every
    live job, and any submit the job it ``replaces``."""
    return (msg["live"] and older.live) or (msg["replaces"] is not None and msg["replaces"] == older.id)
