"""The one rule for connecting Qt's button and action signals to the plugin's code.

Buttons and actions (``clicked``, ``triggered``) send an argument (``checked``) that no handler of
this plugin wants. PyQt passes it on to any callable that accepts it, and a wrapper taking
``*args`` (like ``core.guard.guarded``) accepts it and fails inside: ``refine(False)``. So every
``clicked``/``triggered`` signal in the plugin is connected with :func:`on_click`, which calls the
handler with no arguments at all; ``tests/test_plugin_slots.py`` fails on any other connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def on_click(signal: Any, handler: Callable[[], object]) -> None:
    """Connect a ``clicked``/``triggered`` signal to ``handler()``, dropping the signal's arguments."""

    def slot(*_signal_args: Any) -> None:
        handler()

    signal.connect(slot)
