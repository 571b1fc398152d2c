"""The ZeroMQ service: a ROUTER socket on the I/O thread, one worker thread behind a FIFO queue.

Pattern: ROUTER (service) / DEALER (clients). Every request is validated by the protocol codec
before any work starts; a bad message gets an ``error`` event and the service keeps serving.
Events from the worker arrive on an inproc PULL socket and are forwarded to their client.
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any

import zmq

from krita_sdxl.protocol import CLIENT, PROTOCOL_VERSION, SERVICE, Message, ProtocolError, decode, encode
from krita_sdxl.protocol import errors as codes

from .jobs import Job, JobQueue, QueueFull
from .limits import Limits
from .peers import Peers
from .request import RefineRequest
from .security import CurveConfig, apply_curve, check_exposure
from .worker import Engine, Worker

log = logging.getLogger(__name__)

EVENTS_ENDPOINT = "inproc://krita-sdxl-events"


class Service:
    """Owns the sockets, the queue and the worker. ``serve_forever`` runs until ``stop()``."""

    def __init__(
        self,
        engine: Engine,
        endpoint: str,
        ctx: zmq.Context | None = None,
        limits: Limits | None = None,
        heartbeat_timeout: float = 10.0,
        curve: CurveConfig | None = None,
        insecure: bool = False,
        server_name: str = "krita-sdxl",
        warm_up: bool = False,
    ) -> None:
        """``warm_up``: the worker runs ``engine.warm_up`` before its first job (the speed path compiles
        while clients can already connect; their jobs queue behind it)."""
        check_exposure(endpoint, curve, insecure)
        self.engine = engine
        self.ctx = ctx or zmq.Context.instance()
        self.limits = limits or Limits()
        self.queue = JobQueue(max_total=self.limits.max_jobs_total)
        self.peers = Peers(heartbeat_timeout)
        self.server_name = server_name
        self._stop = threading.Event()
        self._router = self.ctx.socket(zmq.ROUTER)
        self._auth = apply_curve(self.ctx, self._router, curve) if curve else None
        self._curve = curve
        self._keys_stamp: int | None = None
        self._router.setsockopt(zmq.LINGER, 1000)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client with the same id takes over
        self._router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
        self._router.bind(endpoint)
        self.endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._events = self.ctx.socket(zmq.PULL)
        self._events.bind(EVENTS_ENDPOINT + "-" + secrets.token_hex(4))
        warm = getattr(engine, "warm_up", None) if warm_up else None
        self._worker = Worker(
            self.ctx,
            self._events.getsockopt_string(zmq.LAST_ENDPOINT),
            self.queue,
            engine,
            warm_up=(lambda: warm(should_stop=self._stop.is_set)) if warm is not None else None,
        )
        self._capabilities = dict(engine.describe())
        self._capabilities["protocol_version"] = PROTOCOL_VERSION

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
                ready = dict(poller.poll(poll_ms))
                if self._events in ready:
                    self._forward_events()
                if self._router in ready:
                    self._drain_requests()
                self._drop_vanished_clients()
                self._reload_authorized_keys()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        log.info("stopping: cancelling the running job and %d queued job(s)", max(len(self.queue) - 1, 0))
        for job in self.queue.close(reason="shutdown"):
            self._send(job.client, "cancelled", job=job.id, reason="shutdown")
        self._worker.join(timeout=30)
        self._forward_events()  # the running job's "cancelled"
        self._events.close(linger=0)
        self._router.close(linger=1000)
        if self._auth is not None:
            self._auth.stop()
        log.info("stopped")

    def _reload_authorized_keys(self) -> None:
        """Keys added with `krita-sdxl authorize` take effect without a restart."""
        if self._curve is None or self._auth is None:
            return
        try:
            stamp = max(
                [self._curve.authorized_keys.stat().st_mtime_ns]
                + [p.stat().st_mtime_ns for p in self._curve.authorized_keys.glob("*.key")]
            )
        except OSError:
            return
        if stamp != self._keys_stamp:
            self._keys_stamp = stamp
            self._auth.configure_curve(domain="*", location=str(self._curve.authorized_keys))
            log.info("authorized client keys (re)loaded from %s", self._curve.authorized_keys)

    def _drop_vanished_clients(self) -> None:
        for client in self.peers.expired():
            removed = self.queue.cancel_client(client, reason="client_lost")
            for job in removed:  # dropped if the client is really gone; a merely slow one learns why
                self._send(job.client, "cancelled", job=job.id, reason="client_lost")
            if removed or self.queue.snapshot(client)[0] is not None:
                log.warning(
                    "client %s vanished (no heartbeat for %.0f s): cancelled its %d queued job(s) and "
                    "its running job, if any",
                    client.hex(),
                    self.peers.timeout,
                    len(removed),
                )

    # -- I/O ----------------------------------------------------------------------------------

    def _send(self, client: bytes, msg_type: str, images: dict | None = None, **fields: Any) -> None:
        frames = encode(SERVICE, msg_type, images=images, **fields)
        self._router.send_multipart([client, *frames], copy=False)

    def _forward_events(self) -> None:
        while True:
            try:
                frames = self._events.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._router.send_multipart(frames, copy=False)

    def _drain_requests(self) -> None:
        for _ in range(1000):  # bounded, so worker events are not starved by a flood
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            client = frames[0].bytes
            self.peers.seen(client)
            try:
                self._handle(client, decode(CLIENT, frames[1:]))
            except ProtocolError as err:
                log.warning("rejected a message from %s: %s: %s", client.hex(), err.code, err.message)
                self._send(client, "error", job=err.job, code=err.code, message=err.message, field=err.field)
            except Exception as exc:  # never let one message stop the service
                log.exception("internal error while handling a message")
                self._send(
                    client,
                    "error",
                    job=None,
                    code=codes.INTERNAL,
                    field=None,
                    message=f"internal error: {type(exc).__name__}: {exc}",
                )

    # -- requests -----------------------------------------------------------------------------

    def _handle(self, client: bytes, msg: Message) -> None:
        handler = getattr(self, "_on_" + msg.type)
        handler(client, msg)

    def _on_hello(self, client: bytes, msg: Message) -> None:
        log.info("hello from %s (%s)", client.hex(), msg["client"] or "unnamed client")
        caps = dict(self._capabilities)
        caps.update(self._live_memory())
        self._send(client, "welcome", server=self.server_name, capabilities=caps)

    def _live_memory(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("memory", "live_capabilities"):  # live_capabilities: loaded models, memory mode
            live = getattr(self.engine, name, None)
            if callable(live):
                out.update(live())
        return out

    def _on_heartbeat(self, client: bytes, msg: Message) -> None:
        self._send(client, "heartbeat")

    def _on_submit(self, client: bytes, msg: Message) -> None:
        job_id = msg["job"]
        modes = self._capabilities.get("modes", ["refine"])
        if msg["mode"] not in modes:
            raise ProtocolError(
                codes.UNSUPPORTED,
                f"mode {msg['mode']!r} is not supported by this service; supported: {', '.join(modes)}",
                "mode",
                job_id,
            )
        if self.queue.has((client, job_id)):
            raise ProtocolError(codes.DUPLICATE_JOB, f"job {job_id!r} is already queued or running", "job", job_id)
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
            raise ProtocolError(
                codes.BAD_FIELD, "work_width and work_height must be given together", "work_width", job_id
            )
        self.limits.check_submit(msg, self.queue.count(client), len(self.queue))
        seed = msg["seed"] if msg["seed"] is not None else secrets.randbelow(2**32)
        request = RefineRequest.from_message(msg, seed, getattr(self.engine, "timesteps", None))
        try:
            position = self.queue.submit(Job(client, job_id, request))
        except QueueFull as exc:
            raise ProtocolError(codes.LIMIT, str(exc), None, job_id) from None
        except RuntimeError:
            raise ProtocolError(codes.SHUTTING_DOWN, "the service is shutting down", None, job_id) from None
        self._send(
            client,
            "accepted",
            job=job_id,
            position=position,
            seed=seed,
            steps=request.plan.steps,
            denoise_steps=request.plan.denoise_steps,
        )

    def _on_unload(self, client: bytes, msg: Message) -> None:
        """Free a model; a running job keeps it until it ends, a later job that needs it loads it again."""
        model = msg["model"]
        unload = getattr(self.engine, "unload", None)
        if unload is None:
            raise ProtocolError(codes.UNSUPPORTED, "this service cannot unload models", "model")
        was_loaded, deferred = unload(model)
        log.info("unload %s: was loaded %s%s", model, was_loaded, ", after the running job" if deferred else "")
        self._send(client, "unloaded", model=model, was_loaded=was_loaded, deferred=deferred)

    def _on_cancel(self, client: bytes, msg: Message) -> None:
        job_id = msg["job"]
        where = self.queue.cancel((client, job_id))
        if where == "queued":
            self._send(client, "cancelled", job=job_id, reason="cancelled")
        elif where is None:
            raise ProtocolError(
                codes.UNKNOWN_JOB, f"no queued or running job {job_id!r} for this client", "job", job_id
            )
        # running: the worker stops at the next step and sends "cancelled" itself

    def _on_status(self, client: bytes, msg: Message) -> None:
        running, waiting = self.queue.snapshot(client)
        jobs = [{"job": running.id, "state": "running", "position": 0}] if running else []
        jobs += [{"job": j.id, "state": "queued", "position": p} for p, j in waiting]
        if msg["job"] is not None:
            jobs = [j for j in jobs if j["job"] == msg["job"]]
        self._send(client, "status", running=running.id if running else None, jobs=jobs, queue_length=len(self.queue))
