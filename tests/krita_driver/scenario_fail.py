"""Harness self-test: scenarios that go wrong in each way the harness must survive.

params: mode = "raise" (an uncaught exception in a Qt slot, then the scenario raises),
"hang" (polls forever: the driver's watchdog ends it), "block" (blocks Krita's UI thread: only
the harness's hard timeout can end it).
"""

from __future__ import annotations

import time
from typing import Any

from PyQt5.QtCore import QTimer  # type: ignore[import-not-found]


def _slot_that_raises() -> None:
    raise ValueError("boom from a Qt slot")


def run(ctx: Any) -> Any:
    mode = ctx.params["mode"]
    ctx.log(f"failing on purpose: {mode}")
    if mode == "raise":
        QTimer.singleShot(0, _slot_that_raises)
        yield 300
        raise RuntimeError("boom from the scenario")
    if mode == "hang":
        while True:
            yield 100
    if mode == "block":
        time.sleep(ctx.params.get("seconds", 600))
    return {"mode": mode}
