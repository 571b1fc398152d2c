"""A real TCP proxy that limits each direction to a rate (a token bucket), for slow-link tests.

    with ThrottleProxy("127.0.0.1", service_port, rate=2_000_000) as proxy:
        ServiceClient(proxy.endpoint) ...

Threads and blocking sockets: one acceptor, two pumps per connection. Each pump reads at most one
bucket's worth, waits for the tokens, then writes; so the far side sees the bytes arrive at about
``rate`` bytes per second in each direction, as over a link of that speed.
"""

from __future__ import annotations

import socket
import threading
import time


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Wait until ``n`` bytes (at most ``burst``) may pass."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= n:
                    self._tokens -= n
                    return
                wait = (n - self._tokens) / self.rate
            time.sleep(wait)


class ThrottleProxy:
    def __init__(
        self, host: str, port: int, rate: float, burst: int = 32 * 1024, rate_down: float | None = None
    ) -> None:
        """``rate``: bytes per second from the client to the service (and back, unless ``rate_down``)."""
        self.target = (host, port)
        self.rate = rate
        self.rate_down = rate_down or rate
        self.burst = burst
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self.bytes_up = 0  # client to service
        self.bytes_down = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            up, down = TokenBucket(self.rate, self.burst), TokenBucket(self.rate_down, self.burst)
            threading.Thread(target=self._pump, args=(client, server, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, down, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, bucket: TokenBucket, up: bool) -> None:
        try:
            while True:
                data = src.recv(self.burst)
                if not data:
                    break
                bucket.take(len(data))
                dst.sendall(data)
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> ThrottleProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
