"""The one rule for connecting Qt signals to the plugin's code.

Buttons and actions (``clicked``, ``triggered``) send an argument (``checked``) that no handler of
this plugin wants. PyQt passes it on to any callable that accepts it, and a wrapper taking
``*args`` (like :func:`guarded`) accepts it and fails inside: ``refine(False)``. So every
``clicked``/``triggered`` signal in the plugin is connected with :func:`on_click`, which calls the
handler with no arguments at all; ``tests/test_plugin_slots.py`` fails on any other connection.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def on_click(signal: Any, handler: Callable[[], object]) -> None:
    """Connect a ``clicked``/``triggered`` signal to ``handler()``, dropping the signal's arguments."""

    def slot(*_signal_args: Any) -> None:
        handler()

    signal.connect(slot)


def guarded(method: F) -> F:
    """For methods Qt calls (slots): an exception escaping a slot opens Krita's modal error dialog.
    Report it through the object's ``notice`` signal (and its traceback on stderr) instead."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self.notice.emit(f"Internal error in the SDXL Refiner: {type(exc).__name__}: {exc}", "error")
            return None

    return wrapper  # type: ignore[return-value]
