"""A Ray call with a deadline: Ray's own calls (``ray.init`` to a frozen head, ``serve.delete``, the
controller's state, ``ray.put`` into a full store) can block for many minutes or for ever, and most take
no timeout. ``bounded`` runs one in a daemon thread and gives up after ``timeout`` seconds: the caller gets
:class:`RayTimeout` and goes on; the stuck call is left behind in its thread (it cannot be interrupted).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class RayTimeout(TimeoutError):
    """A Ray call did not return in time; the message names it and the time."""


def bounded(what: str, timeout: float, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, or :class:`RayTimeout` after ``timeout`` seconds. Its exception, if it
    raises one, is raised here. Signals still reach the calling (main) thread while it waits."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"krita-sdxl-ray-call: {what}", daemon=True).start()
    if not done.wait(timeout):
        raise RayTimeout(f"{what} did not return within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
