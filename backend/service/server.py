"""The ZeroMQ service: a ROUTER socket on the I/O thread, a worker thread behind a fair queue.

Pattern: ROUTER (service) / DEALER (clients). Every request is validated by the protocol codec
before any work starts; a bad message gets an ``error`` event and the service keeps serving: no
message, and no exception anywhere in the I/O loop, stops it. Events from the worker arrive on an
inproc PULL socket and are forwarded to the client that owns the job (backend/service/sessions.py says who
that is and who may receive them).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, cast

import zmq

from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.setup.plan import VERSION
from krita_sdxl.protocol import CLIENT, PROTOCOL_VERSION, SERVICE, Message, ProtocolError, decode, encode
from krita_sdxl.protocol import errors as codes
from krita_sdxl.protocol.codec import MAX_CLIENT_FRAMES, error_event, error_fields, peek_job
from krita_sdxl.protocol.endpoint import EndpointError, check_ipc_bind, parse_endpoint

from .authorized import AuthorizedKeys
from .deliveries import Deliveries
from .jobs import Job, JobQueue, Owner, QueueFull
from .limits import Limits
from .peers import Peers
from .ratelog import RateLimitedLog
from .security import CurveConfig, SecurityError, apply_curve, check_exposure
from .sessions import Sessions, routing_id_problem
from .worker import Described, Worker, WorkerFactory

log = logging.getLogger(__name__)

EVENTS_ENDPOINT = "inproc://krita-sdxl-events"
# ZMTP heartbeats on the ROUTER: a peer that stops answering pings is dropped after a few seconds,
# which frees its routing id for the same client reconnecting (ROUTER_HANDOVER is off).
ZMTP_HEARTBEAT_IVL_MS = 1000
ZMTP_HEARTBEAT_TIMEOUT_MS = 3000
ZMTP_HEARTBEAT_TTL_MS = 5000
HOUSEKEEPING_S = 0.2  # vanished clients, undelivered results, authorized keys


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
    ) -> None:
        """``warm_up``: the worker runs ``engine.warm_up`` before its first job (the speed path compiles
        while clients can already connect; their jobs queue behind it). ``worker``: what runs the jobs
        instead of the one worker thread, called as ``Worker`` is (the Ray pool: backend/pool)."""
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
        self.server_name = server_name
        self._stop = threading.Event()
        self._rejected = RateLimitedLog(log)
        self._keys = AuthorizedKeys(curve.authorized_keys) if curve else None
        if self._keys is not None:
            self._keys.reload()
        self._router = self.ctx.socket(zmq.ROUTER)
        self._auth = None
        try:
            self._auth = apply_curve(self.ctx, self._router, curve, self._keys) if curve and self._keys else None
            self._router.setsockopt(zmq.LINGER, 1000)
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 0)  # a live client's id cannot be taken over
            self._router.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_IVL_MS)
            self._router.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_HEARTBEAT_TIMEOUT_MS)
            self._router.setsockopt(zmq.HEARTBEAT_TTL, ZMTP_HEARTBEAT_TTL_MS)
            self._router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
            self._router.bind(where.text)
        except BaseException:
            self._router.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            raise
        self.endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
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
        self._next_housekeeping = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish (safe from signal handlers and other threads)."""
        self._stop.set()

    def serve_forever(self, poll_ms: int = 100) -> None:
        self._worker.start()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
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

    def _shutdown(self) -> None:
        log.info("stopping: cancelling the running job and %d queued job(s)", max(len(self.queue) - 1, 0))
        for job in self.queue.close(reason="shutdown"):
            self._send_to(job.owner, "cancelled", job=job.id, reason="shutdown")
        self._worker.join(timeout=30)
        self._forward_events()  # the running job's "cancelled"
        self._events.close(linger=0)
        self._router.close(linger=1000)
        if self._auth is not None:
            self._auth.stop()
        log.info("stopped")

    def _reload_authorized_keys(self) -> None:
        """Keys added with `krita-sdxl authorize` take effect without a restart; a removed key (or a
        deleted folder) ends its clients' sessions: their jobs are cancelled and they get nothing more."""
        if self._keys is None:
            return
        removed = self._keys.reload()
        if not removed:
            return
        cancelled = self.queue.cancel_where(lambda owner: owner.key in removed, reason="unauthorized")
        for routing in self.sessions.routings_of(removed):
            self.sessions.forget(routing)
            self.peers.forget(routing)
        log.warning("ended the sessions of %d removed key(s); %d queued job(s) dropped", len(removed), len(cancelled))

    def _drop_vanished_clients(self) -> None:
        for client in self.peers.expired():
            self.sessions.forget(client)
            removed = self.queue.cancel_where(lambda owner, c=client: owner.routing == c, reason="client_lost")
            for job in removed:  # dropped if the client is really gone; a merely slow one learns why
                self._send_to(job.owner, "cancelled", job=job.id, reason="client_lost")
            if removed or any(j.client == client for j in self.queue.running):
                log.warning(
                    "client %s vanished (no heartbeat for %.0f s): cancelled its %d queued job(s) and "
                    "its running job, if any",
                    client.hex(),
                    self.peers.timeout,
                    len(removed),
                )

    # -- I/O ----------------------------------------------------------------------------------

    def _may_send(self, owner: Owner) -> bool:
        if self._keys is not None and owner.key not in self._keys:
            return False  # a removed key: its client gets nothing more
        return self.sessions.may_send(owner)

    def _send(self, client: bytes, msg_type: str, images: dict | None = None, **fields: Any) -> None:
        frames = encode(SERVICE, msg_type, images=images, **fields)
        self._router.send_multipart([client, *frames], copy=False)

    def _send_to(self, owner: Owner, msg_type: str, **fields: Any) -> None:
        """An event about one of ``owner``'s jobs, sent only if ``owner`` may still receive it."""
        if self._may_send(owner):
            self._send(owner.routing, msg_type, **fields)

    def _send_error(self, client: bytes, job: Any, code: str, message: str, field: Any = None) -> None:
        """Never raises: every echoed text is clipped, so the event always encodes."""
        try:
            self._send(client, "error", **error_event(job, code, message, field))
        except Exception:
            log.exception("could not send an error event to %s", client.hex())

    def _forward_events(self) -> None:
        """Worker events, [routing id, key, header, *images], to the job's owner."""
        while True:
            try:
                frames = self._events.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                owner = Owner(frames[0].bytes, frames[1].bytes)
                if not self._may_send(owner):
                    continue
                images = self.deliveries.wrap(owner.account, frames[3:]) if len(frames) > 3 else []
                self._router.send_multipart([frames[0], frames[2], *images], copy=False)
            except Exception:
                log.exception("could not forward an event from the worker")

    def _recv_bounded(self) -> tuple[list[zmq.Frame], int] | None:
        """One message as [routing id, up to MAX_CLIENT_FRAMES frames], and how many frames beyond
        that were read and dropped; None when nothing is waiting."""
        try:
            first = self._router.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        frames, extra, more = [first], 0, first.more
        while more:  # the rest of a multipart message is already there
            part = self._router.recv(copy=False)
            more = part.more
            if len(frames) <= MAX_CLIENT_FRAMES:
                frames.append(part)
            else:
                extra += 1
        return frames, extra

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
        """The CURVE public key (Z85) the ZAP handler authenticated this message's sender with."""
        try:
            uid = frame.get("User-Id")
        except zmq.ZMQError:
            return b""
        return uid.encode("ascii", "replace") if isinstance(uid, str) else bytes(uid)

    def _on_frames(self, frames: list[zmq.Frame], extra: int) -> None:
        client = frames[0].bytes
        if len(frames) < 2:
            return
        header = frames[1]
        problem = routing_id_problem(client)
        if problem is not None:
            self._rejected.warning("refused a message from the predictable routing id %s", client.hex())
            self._send_error(client, peek_job(header), codes.BAD_IDENTITY, problem)
            return
        key = b""
        if self._keys is not None:
            key = self._user_id(header)
            if key not in self._keys:  # authorized a moment ago (the handshake looked it up on disk)?
                self._reload_authorized_keys()
            if key not in self._keys:  # its key was removed while it was connected: nothing more
                self._rejected.warning("dropped a message from a client whose key is no longer authorized")
                return
            taken = self.sessions.bind(client, key)
            if taken is not None:
                self._rejected.warning("refused %s: routing id %s belongs to another key", key.decode(), client.hex())
                self._send_error(client, peek_job(header), codes.BAD_IDENTITY, taken)
                return
        else:
            self.sessions.bind(client, key)
        self.peers.seen(client)
        try:
            if extra:
                raise ProtocolError(
                    codes.FRAME_MISMATCH,
                    f"a message has at most {MAX_CLIENT_FRAMES} frames (a header, an image and a mask); "
                    f"this one has {len(frames) - 1 + extra}",
                    None,
                    peek_job(header),
                )
            self._handle(Owner(client, key), decode(CLIENT, frames[1:]))
        except ProtocolError as err:
            self._rejected.warning("rejected a message from %s: %s: %.200s", client.hex(), err.code, err.message)
            self._send_error(client, **error_fields(err))
        except Exception as exc:  # never let one message stop the service
            log.exception("internal error while handling a message")
            self._send_error(client, peek_job(header), codes.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    # -- requests -----------------------------------------------------------------------------

    def _handle(self, owner: Owner, msg: Message) -> None:
        handler = getattr(self, "_on_" + msg.type)
        handler(owner, msg)

    def _on_hello(self, owner: Owner, msg: Message) -> None:
        log.info("hello from %s (%.200s)", owner.routing.hex(), msg["client"] or "unnamed client")
        caps = dict(self._capabilities)
        caps.update(self._live_memory())
        self._send(owner.routing, "welcome", server=self.server_name, capabilities=caps)

    def _live_memory(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("memory", "live_capabilities"):  # live_capabilities: loaded models, memory mode
            live = getattr(self.engine, name, None)
            if callable(live):
                out.update(cast(dict[str, Any], live()))
        return out

    def _on_heartbeat(self, owner: Owner, msg: Message) -> None:
        self._send(owner.routing, "heartbeat")

    def _on_submit(self, owner: Owner, msg: Message) -> None:
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
            raise ProtocolError(codes.DUPLICATE_JOB, f"job {job_id!r} is already queued or running", "job", job_id)
        check_images(msg)
        self.limits.check_submit(msg)
        seed = msg["seed"] if msg["seed"] is not None else secrets.randbelow(2**32)
        try:  # plan (and refuse impossible step counts) before anything is queued
            request = RefineRequest.from_message(msg, seed, getattr(self.engine, "timesteps", None))
        except ProtocolError as err:
            err.job = job_id
            raise
        nbytes = sum(img.spec.byte_length for img in msg.images.values())
        self._supersede(owner, msg)

        def announce(position: int) -> None:  # under the queue's lock: no worker sees the job before this
            self._send(
                owner.routing,
                "accepted",
                job=job_id,
                position=position,
                seed=seed,
                steps=request.plan.steps,
                denoise_steps=request.plan.denoise_steps,
            )

        try:
            dropped = self.queue.submit(Job(owner, job_id, request, nbytes=nbytes, live=msg["live"]), announce)
        except QueueFull as exc:
            raise ProtocolError(codes.LIMIT, str(exc), None, job_id) from None
        except KeyError:
            raise ProtocolError(
                codes.DUPLICATE_JOB, f"job {job_id!r} is already queued or running", "job", job_id
            ) from None
        except RuntimeError:
            raise ProtocolError(codes.SHUTTING_DOWN, "the service is shutting down", None, job_id) from None
        for job in dropped:
            log.warning("queue full: dropped job %s of %s for %s", job.id, job.client.hex(), owner.routing.hex())
            self._send_to(
                job.owner,
                "error",
                **error_event(
                    job.id,
                    codes.LIMIT,
                    "dropped from the queue to make room for another client's job: the queue is full and this "
                    "client held the most of it. Submit fewer jobs at once",
                ),
            )

    def _supersede(self, owner: Owner, msg: Message) -> None:
        """A ``live`` submit (or one that names the job it ``replaces``) supersedes: the older job, if
        still queued, ends now with ``cancelled`` (reason ``superseded``); if running, the worker stops
        it at its next step boundary and sends the same. Called once the new job has passed every check."""
        if not msg["live"] and msg["replaces"] is None:
            return
        for old in self.queue.supersede(owner, msg["live"], msg["replaces"]):
            log.info("job %.80r superseded by %.80r", old.id, msg["job"])
            self._send_to(old.owner, "cancelled", job=old.id, reason="superseded")

    def _on_unload(self, owner: Owner, msg: Message) -> None:
        """Free a model; a running job keeps it until it ends, a later job that needs it loads it again."""
        model = msg["model"]
        unload = getattr(self.engine, "unload", None)
        if unload is None:
            raise ProtocolError(codes.UNSUPPORTED, "this service cannot unload models", "model")
        was_loaded, deferred = unload(model)
        log.info("unload %s: was loaded %s%s", model, was_loaded, ", after the running job" if deferred else "")
        self._send(owner.routing, "unloaded", model=model, was_loaded=was_loaded, deferred=deferred)

    def _on_cancel(self, owner: Owner, msg: Message) -> None:
        job_id = msg["job"]
        where = self.queue.cancel((owner, job_id))
        if where == "queued":
            self._send(owner.routing, "cancelled", job=job_id, reason="cancelled")
        elif where is None:
            raise ProtocolError(
                codes.UNKNOWN_JOB, f"no queued or running job {job_id!r} for this client", "job", job_id
            )
        # running: the worker stops at the next step and sends "cancelled" itself

    def _on_status(self, owner: Owner, msg: Message) -> None:
        running, waiting = self.queue.snapshot(owner)
        jobs = [{"job": j.id, "state": "running", "position": 0, **_where(j)} for j in running]
        jobs += [{"job": j.id, "state": "queued", "position": p} for p, j in waiting]
        if msg["job"] is not None:
            jobs = [j for j in jobs if j["job"] == msg["job"]]
        self._send(
            owner.routing,
            "status",
            running=running[0].id if running else None,
            jobs=jobs,
            queue_length=len(self.queue),
        )


def _where(job: Job) -> dict[str, str]:
    """A running job's ``replica`` (the pool's replica that runs it) for ``status``; none in one process."""
    return {"replica": job.runner} if job.runner else {}


def check_images(msg: Message) -> None:
    """The submit's image and mask fit together (formats and sizes the codec cannot judge alone)."""
    job_id = msg["job"]
    mask = msg.images.get("mask")
    image = msg.images["image"]
    if mask is not None:
        if mask.spec.order != "L" or mask.spec.sample != "uint":
            raise ProtocolError(
                codes.BAD_FIELD, "mask must be a one-channel (order L) uint image", "mask.order", job_id
            )
        if (mask.spec.width, mask.spec.height) != (image.spec.width, image.spec.height):
            raise ProtocolError(
                codes.BAD_FIELD,
                f"mask is {mask.spec.width}x{mask.spec.height} but image is "
                f"{image.spec.width}x{image.spec.height}; they must match",
                "mask",
                job_id,
            )
    if image.spec.order == "L":
        raise ProtocolError(
            codes.BAD_FIELD, "image must have colour channels (RGBA, BGRA, RGB or BGR)", "image.order", job_id
        )
    if (msg["work_width"] is None) != (msg["work_height"] is None):
        raise ProtocolError(codes.BAD_FIELD, "work_width and work_height must be given together", "work_width", job_id)
