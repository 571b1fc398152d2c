"""The connection to the backend service: the only code in the plugin that touches sockets.

A ZeroMQ DEALER socket driven by Qt's event loop (a ``QSocketNotifier`` on the socket's FD), so the
UI thread never blocks or sleeps. ZeroMQ's FD is edge-triggered: every activation (and every send,
and every timer tick as a safety net) drains the socket while ``EVENTS`` says ``POLLIN``.

Liveness, "Lazy Pirate" style: ``hello`` on connect, ``heartbeat`` every ``interval`` seconds while
connected; no message for ``timeout`` seconds closes the socket (linger 0) and opens a new one,
again and again until the service answers. The routing id stays the same across reopenings, so a
service that was only slow (not restarted) still routes a running job's events to us.

Pixels travel in 1 MiB chunks under the service's credit (protocol/streams.py): a submit's chunks go
as its ``credit`` events arrive (they are passed on: the upload's progress), one upload at a time;
a result is passed on once all its chunks are in. No message is larger than a chunk, so a large
layer over a slow link never runs into the heartbeat timeout, and the UI thread never sends more
than one chunk at a time.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import zmq
from PyQt5.QtCore import QObject, QSocketNotifier, QTimer, pyqtSignal

from krita_sdxl.protocol import CLIENT, SERVICE, Image, ProtocolError, decode, encode
from krita_sdxl.protocol.endpoint import EndpointError, check_ipc_connect, parse_endpoint
from krita_sdxl.protocol.streams import ClientStreams

from ..core.connection import ConnectionState, CurveKeys

CLIENT_NAME = "krita-sdxl-refiner"


def _apply_curve(sock: zmq.Socket, keys: CurveKeys) -> None:
    from zmq import auth as zmq_auth

    if len(keys.server_public_key) != 40:
        raise ValueError("the server public key must be the 40-character Z85 text from the service's .key file")
    public, secret = zmq_auth.load_certificate(keys.client_secret_file)
    if not secret:
        raise ValueError(f"{keys.client_secret_file} holds no secret key (use the .key_secret file)")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = keys.server_public_key.encode("ascii")


REOPEN_PAUSE_MS = 150  # between closing a socket and reopening it with the same routing id
DRAIN_BATCH = 8  # messages handled per turn of Qt's event loop (at most 8 MiB of chunks)


class Client(QObject):
    """The workflow's ``core.connection.Connection`` over ZeroMQ. Signals carry plain
    values; ``received`` carries a decoded :class:`Message` (every service event except ``welcome`` and
    ``heartbeat``, which this class handles)."""

    state_changed = pyqtSignal(str, str)  # state, detail for people
    welcomed = pyqtSignal(str, dict)  # server, capabilities
    received = pyqtSignal(object)  # krita_sdxl.protocol.Message
    problem = pyqtSignal(str)  # a message that could not be decoded, a send that failed

    def __init__(
        self,
        endpoint: str,
        interval: float = 2.0,
        timeout: float = 5.0,
        context: zmq.Context | None = None,
        parent: QObject | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        super().__init__(parent)
        self._endpoint = endpoint
        self._curve = curve
        self._interval = interval
        self._timeout = timeout
        self._context = context or zmq.Context.instance()
        self._identity = f"krita-{uuid.uuid4().hex}".encode()
        self._socket: zmq.Socket | None = None
        self._notifier: QSocketNotifier | None = None
        self._state = ConnectionState.disconnected
        self._detail = "not started"
        self._opened_at = 0.0
        self._generation = 0
        self._last_received = 0.0
        self._draining = False
        self._streams = ClientStreams()
        self.server = ""
        self.capabilities: dict[str, Any] = {}
        self._timer = QTimer(self)
        self._timer.setInterval(max(10, int(interval * 1000)))
        self._timer.timeout.connect(self._tick)

    # --- public ------------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def detail(self) -> str:
        return self._detail

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def is_connected(self) -> bool:
        return self._state is ConnectionState.connected

    def start(self) -> None:
        self._timer.start()
        self._open(announce=True)

    def stop(self) -> None:
        self._timer.stop()
        self._close()
        self._set_state(ConnectionState.disconnected, "stopped")

    def set_endpoint(self, endpoint: str) -> None:
        endpoint = endpoint.strip()
        if endpoint == self._endpoint:
            return
        self._endpoint = endpoint
        if self._timer.isActive():
            self._open(announce=True)

    def set_curve(self, curve: CurveKeys | None) -> None:
        if curve == self._curve:
            return
        self._curve = curve
        if self._timer.isActive():
            self._open(announce=True)

    def reconnect(self, reason: str) -> None:
        """The service is known to be gone (e.g. the local backend was stopped): show it now and
        start over, instead of waiting for the heartbeat timeout."""
        if self._timer.isActive():
            self._reset(reason)

    def send(self, msg_type: str, images: dict[str, Image] | None = None, **fields: Any) -> bool:
        """Encode (validating every field) and queue one message without blocking. Returns False,
        and emits ``problem``, when there is no socket or its queue is full. A ``submit`` waits here
        for the uploads before it (one at a time); its pixels follow under the service's credit."""
        if msg_type == "submit":
            if self._socket is None:
                self.problem.emit(f"cannot send submit: not connected to {self._endpoint}")
                return False
            sent = [self._send_frames(frames, "submit") for frames in self._streams.submit(images or {}, **fields)]
            return all(sent)
        if msg_type == "cancel":  # a submit still waiting here is never sent (the service says unknown_job)
            self._streams.cancel(str(fields.get("job")))
        frames = encode(CLIENT, msg_type, images=images, **fields)
        return self._send_frames(frames, msg_type)

    # --- socket lifecycle --------------------------------------------------------------------

    def _open(self, announce: bool = False, pause: bool = False) -> None:
        """(Re)open the socket and say hello. ``announce``: show "connecting" (a first start or a
        new endpoint); a retry after a timeout keeps showing why the connection was lost. The
        endpoint is checked first (:mod:`krita_sdxl.protocol.endpoint`): a mistyped one is shown,
        not connected to; an ``ipc`` socket must exist and belong to this user (no squatter).

        ``pause``: a retry on the same endpoint waits REOPEN_PAUSE_MS after closing the old socket:
        the service refuses a routing id that is still in use (no session takeover), and ours is kept
        across reopenings so that the service's events for our jobs still reach us."""
        had_socket = self._socket is not None
        self._close()
        self._streams.reconnected()
        self._opened_at = time.monotonic()
        self._generation += 1
        if had_socket and pause:
            generation = self._generation
            QTimer.singleShot(REOPEN_PAUSE_MS, lambda: self._connect_now(announce, generation))
            return
        self._connect_now(announce, self._generation)

    def _connect_now(self, announce: bool, generation: int) -> None:
        if generation != self._generation or self._socket is not None:
            return  # superseded by a later open or close
        try:
            endpoint = parse_endpoint(self._endpoint)
        except EndpointError as exc:
            self._set_state(ConnectionState.invalid, str(exc))
            return
        try:
            check_ipc_connect(endpoint)
        except EndpointError as exc:
            self._set_state(ConnectionState.disconnected, f"{exc}; retrying")
            return
        sock = self._context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, self._identity)
            sock.setsockopt(zmq.RECONNECT_IVL, 250)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            if self._curve is not None:
                _apply_curve(sock, self._curve)
            sock.connect(endpoint.text)
        except (zmq.ZMQError, OSError, ValueError) as exc:
            sock.close(linger=0)
            what = "CURVE keys" if self._curve is not None and not isinstance(exc, zmq.ZMQError) else "endpoint"
            self._set_state(ConnectionState.disconnected, f"cannot use {what} for {self._endpoint!r}: {exc}")
            return
        self._socket = sock
        self._notifier = QSocketNotifier(sock.getsockopt(zmq.FD), QSocketNotifier.Read, self)
        self._notifier.activated.connect(self._drain)
        if announce:
            self._set_state(ConnectionState.connecting, self._endpoint)
        self._send_frames(encode(CLIENT, "hello", client=CLIENT_NAME), "hello")

    def _close(self) -> None:
        self._generation += 1  # a reopening still waiting for its pause is cancelled
        if self._notifier is not None:
            self._notifier.setEnabled(False)
            self._notifier.activated.disconnect()
            self._notifier.deleteLater()
            self._notifier = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _reset(self, reason: str) -> None:
        self._set_state(ConnectionState.disconnected, reason)
        self._open(pause=True)

    def _tick(self) -> None:
        self._drain()
        now = time.monotonic()
        if self._socket is None:
            if self._state is not ConnectionState.invalid and now - self._opened_at >= self._timeout:
                self._open()
            return
        if self._state is ConnectionState.connected:
            silent = now - self._last_received
            if silent >= self._timeout:
                self._reset(f"no reply from {self._endpoint} for {silent:.0f} s; retrying")
            else:
                self._send_frames(encode(CLIENT, "heartbeat"), "heartbeat")
        elif now - self._opened_at >= self._timeout:
            hint = " (are the CURVE keys right?)" if self._curve is not None else ""
            self._reset(f"no answer from {self._endpoint}{hint}; retrying")

    # --- I/O ---------------------------------------------------------------------------------

    def _send_frames(self, frames: list[Any], what: str) -> bool:
        sock = self._socket
        if sock is None:
            self.problem.emit(f"cannot send {what}: not connected to {self._endpoint}")
            return False
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.problem.emit(f"cannot send {what}: the send queue to {self._endpoint} is full")
            return False
        except zmq.ZMQError as exc:
            self.problem.emit(f"cannot send {what}: {exc}")
            return False
        finally:
            # A send can consume the FD's edge: look for input once control is back in the loop.
            QTimer.singleShot(0, self._drain)
        return True

    def _drain(self, *_: Any) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            for _ in range(DRAIN_BATCH):
                sock = self._socket
                if sock is None:
                    break
                try:
                    if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        break
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    self.problem.emit(f"receive failed: {exc}")
                    break
                self._handle(frames)
            else:  # more may be waiting: the rest after Qt has had its turn (a result's chunks copy 1 MiB each)
                QTimer.singleShot(0, self._drain)
        finally:
            self._draining = False

    def _handle(self, frames: list[Any]) -> None:
        self._last_received = time.monotonic()
        try:
            msg = decode(SERVICE, frames)
        except ProtocolError as err:
            self.problem.emit(f"the backend sent a message this plugin cannot read ({err.code}): {err.message}")
            return
        if msg.type == "welcome":
            self.server = msg["server"]
            self.capabilities = dict(msg["capabilities"])
            self._set_state(ConnectionState.connected, self._endpoint)
            self.welcomed.emit(self.server, self.capabilities)
        elif msg.type == "heartbeat":
            pass
        else:
            event, send = self._streams.on_event(msg)
            for frames in send:  # chunks the credit allows, acknowledgements, the next submit
                self._send_frames(frames, "a chunk or credit")
            if event is not None:
                self.received.emit(event)

    def _set_state(self, state: ConnectionState, detail: str) -> None:
        changed = state is not self._state or detail != self._detail
        self._state, self._detail = state, detail
        if changed:
            self.state_changed.emit(state.value, detail)
