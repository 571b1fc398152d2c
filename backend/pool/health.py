"""The pool's watchdog: notices that Ray is gone under the service before Ray ends the process silently.

Ray ends a driver whose node is lost: 15 s after its local raylet dies (the head marks the node dead),
60 s after the head's GCS stops answering, with nothing said to the service's clients. The watchdog looks
every half second; when a check has failed for longer than its grace it calls ``on_lost`` once with the
reason, and the service ends every live job with ``model_error`` saying so and exits non-zero
(backend/cli/main.py). Between checks it runs the pool's chores (renewing its name's lease, telling the
reaper about new Ray processes).

- The local raylet: its socket refuses connections (or is gone). A raylet that is merely slow still
  accepts, so this never fires on a busy host.
- The head's GCS: refused, or no answer to one call within 2 s, for 20 s (Ray gives up after 60 s).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("krita_sdxl.pool")

EVERY_S = 0.5
RAYLET_GRACE_S = 1.0
GCS_GRACE_S = 20.0
GCS_EVERY_S = 2.0


@dataclass
class Check:
    name: str
    run: Callable[[], str | None]  # None: fine; else what is wrong
    grace: float  # seconds it may fail before the pool counts as lost
    every: float = EVERY_S
    failing_since: float | None = None
    next_at: float = 0.0


def raylet_check(socket_path: str) -> Callable[[], str | None]:
    def run() -> str | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(1.0)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return "Ray's node on this host stopped (its raylet is gone)"
            return None  # busy or slow: not a verdict
        finally:
            sock.close()
        return None

    return run


def gcs_check(address: str, token_fn: Callable[[], object]) -> Callable[[], str | None]:
    from .reach import probe

    def run() -> str | None:
        problem = probe(address, token_fn(), timeout=GCS_EVERY_S)  # type: ignore[arg-type]
        if problem is None or problem == "unauthenticated":
            return None
        return f"the Ray cluster's head ({address}) stopped answering ({problem})"

    return run


class Watchdog(threading.Thread):
    def __init__(
        self,
        checks: list[Check],
        on_lost: Callable[[str], None],
        chores: list[tuple[float, Callable[[], None]]] | None = None,
    ) -> None:
        super().__init__(name="krita-sdxl-pool-watchdog", daemon=True)
        self._checks = checks
        self._on_lost = on_lost
        self._chores = [[every, fn, 0.0] for every, fn in (chores or [])]
        self._stop = threading.Event()
        self.lost: str | None = None

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.wait(EVERY_S):
            now = time.monotonic()
            for check in self._checks:
                if now < check.next_at:
                    continue
                check.next_at = now + check.every
                try:
                    problem = check.run()
                except Exception as exc:
                    log.debug("pool watchdog: the %s check failed: %s", check.name, exc)
                    problem = None
                if problem is None:
                    check.failing_since = None
                    continue
                check.failing_since = check.failing_since or now
                if now - check.failing_since >= check.grace and self.lost is None:
                    self.lost = problem
                    log.error("pool: %s", problem)
                    self._on_lost(problem)
                    return
            for chore in self._chores:
                every, fn, due = chore
                if now >= due:
                    chore[2] = now + every
                    try:
                        fn()
                    except Exception as exc:
                        log.debug("pool watchdog: a chore failed: %s", exc)
