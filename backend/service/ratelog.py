"""A log that says a flood of similar lines once: at most ``per_second`` lines, then a count."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, per_second: int = 5, clock: Callable[[], float] = time.monotonic):
        self._log = logger
        self._per_second = per_second
        self._clock = clock
        self._window = clock()
        self._count = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = self._clock()
        if now - self._window >= 1.0:
            if self._suppressed:
                self._log.warning("... and %d more like it in the last second", self._suppressed)
            self._window, self._count, self._suppressed = now, 0, 0
        if self._count < self._per_second:
            self._count += 1
            self._log.warning(msg, *args)
        else:
            self._suppressed += 1
