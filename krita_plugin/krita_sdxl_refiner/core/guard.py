"""``guarded``: an exception escaping a method that Qt or a signal calls becomes a notice, never a crash."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


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
