"""The bound on what one TCP peer can make the service hold before it reads it (Linux).

libzmq hands a multipart message to the application only once all its frames have arrived, and it
counts its receive high-water mark in whole messages: one message of 3,000 frames of 1 MiB is held
whole (3.4 GB) before the service can refuse it. ``ZMQ_MAXMSGSIZE`` bounds one frame, and libzmq
has no limit on frames per message. So the service watches each TCP connection from outside:

    unread = bytes the kernel received - bytes still in the kernel's queue
             - bytes of the messages the service has read from that connection (with their framing)
             - an allowance for the handshake and the heartbeats

``unread`` is what libzmq holds for the peer: a frame it is still receiving, the frames of a message
not complete yet, complete messages the service has not read. A peer that follows the protocol
keeps it under one credit window (transfer.py: 4 MiB) plus small messages; a connection whose
``unread`` exceeds the budget is shut down (libzmq then frees what it held). The kernel's counters
come from ``TCP_INFO`` (``tcpi_bytes_received``, Linux 4.1+) and ``FIONREAD``, polled every
``interval`` from this thread; between two polls a peer can add what the link carries in that time
(on loopback about 20 MB in 20 ms). ipc peers are local (the socket is in a private folder) and
are not watched; neither is any connection on a system without ``TCP_INFO``.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

HANDSHAKE_ALLOWANCE = 4096  # ZMTP greeting and handshake commands (CURVE's are about 1 KiB)
HEARTBEAT_ALLOWANCE_PER_S = 96  # a PONG for each of the service's PINGs (1/s), and the peer's own PINGs
CURVE_FRAME_OVERHEAD = 33  # "\x07MESSAGE", 8-byte nonce, 16-byte MAC, the flags byte
_TCP_INFO_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in struct tcp_info
_TCP_INFO_SIZE = 232


def frame_wire_bytes(size: int, curve: bool) -> int:
    """Bytes one message frame of ``size`` bytes takes on the wire (ZMTP 3, NULL or CURVE)."""
    body = size + CURVE_FRAME_OVERHEAD if curve else size
    return body + (2 if body <= 255 else 9)


class _Kernel:
    """TCP_INFO and FIONREAD of a descriptor libzmq owns (through libc: no Python socket object,
    which would close the descriptor if collected)."""

    def __init__(self) -> None:
        self.available = False
        if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO"):
            return
        try:
            import fcntl
            import termios

            self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            self._ioctl = fcntl.ioctl
            self._fionread = termios.FIONREAD
        except (OSError, ImportError, AttributeError):
            return
        self._buf = ctypes.create_string_buffer(_TCP_INFO_SIZE)
        self._len = ctypes.c_uint32(_TCP_INFO_SIZE)
        self._count = array.array("i", [0])
        self.available = True

    def unread_in_libzmq(self, fd: int) -> int | None:
        """Bytes received on ``fd`` minus those still in the kernel's queue; None: not a TCP socket."""
        self._len.value = _TCP_INFO_SIZE
        if self._libc.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, self._buf, ctypes.byref(self._len)) != 0:
            return None
        if self._len.value < _TCP_INFO_BYTES_RECEIVED + 8:
            return None
        received = struct.unpack_from("Q", self._buf.raw, _TCP_INFO_BYTES_RECEIVED)[0]
        try:
            self._ioctl(fd, self._fionread, self._count)
        except OSError:
            return None
        return received - self._count[0]


@dataclass
class _Conn:
    opened: float
    read: int = 0  # wire bytes of the messages the service has read from this connection
    cut: bool = False


class IntakeGuard(threading.Thread):
    """Shuts down TCP connections whose unread input exceeds ``budget`` bytes."""

    def __init__(
        self,
        budget: int,
        curve: bool,
        cut: Callable[[int], bool],
        interval: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="krita-sdxl-intake", daemon=True)
        self.budget = budget
        self.curve = curve
        self.interval = interval
        self._cut = cut  # shuts a connection down; False when the descriptor is no longer that connection
        self._clock = clock
        self._kernel = _Kernel()
        self._lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}
        self._stop = threading.Event()
        self.cuts = 0  # connections shut down so far
        self.peak_unread = 0  # the most unread input seen on one connection

    @property
    def available(self) -> bool:
        return self._kernel.available

    # -- called by the I/O thread ---------------------------------------------------------------

    def opened(self, fd: int) -> None:
        with self._lock:
            self._conns[fd] = _Conn(self._clock())

    def closed(self, fd: int) -> None:
        with self._lock:
            self._conns.pop(fd, None)

    def read(self, fd: int, frame_sizes: Sequence[int]) -> None:
        """The service read one message of these frame sizes from ``fd``."""
        conn = self._conns.get(fd)
        if conn is not None:
            conn.read += sum(frame_wire_bytes(n, self.curve) for n in frame_sizes)

    def stop(self) -> None:
        self._stop.set()

    # -- the watch --------------------------------------------------------------------------------

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                started = time.perf_counter()
                self.sweep()
                spent = time.perf_counter() - started
                if spent * 10 > self.interval:  # at most about a tenth of a core, however many peers
                    self._stop.wait(spent * 10 - self.interval)
            except Exception:
                log.exception("intake guard: sweep failed; going on")

    def sweep(self) -> list[int]:
        """Check every connection once; returns the descriptors shut down."""
        if not self._kernel.available:
            return []
        with self._lock:
            conns = list(self._conns.items())
        now = self._clock()
        cut = []
        for fd, conn in conns:
            if conn.cut:
                continue
            held = self._kernel.unread_in_libzmq(fd)
            if held is None:
                continue
            allowance = HANDSHAKE_ALLOWANCE + HEARTBEAT_ALLOWANCE_PER_S * max(0.0, now - conn.opened)
            unread = held - conn.read - int(allowance)
            if unread > self.peak_unread:
                self.peak_unread = unread
            if unread <= self.budget:
                continue
            with self._lock:
                if self._conns.get(fd) is not conn:
                    continue  # closed meanwhile: the descriptor may be another connection's now
                conn.cut = True
            if self._cut(fd):
                self.cuts += 1
                cut.append(fd)
                log.warning(
                    "shut down a connection holding %.1f MiB of input the service has not read (the limit is "
                    "%.1f MiB: a message of many frames, or a peer that sends beyond its credit)",
                    unread / 2**20,
                    self.budget / 2**20,
                )
        return cut
