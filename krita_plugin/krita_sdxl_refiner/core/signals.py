"""A pure-Python signal with Qt's direct-connection behaviour, for the workflow's events (no PyQt5).

``Signal`` is declared on a class like ``pyqtSignal``; each instance gets its own :class:`BoundSignal`
with ``connect``, ``disconnect`` and ``emit``. A bound signal is callable (calling it emits), so it can
be connected to another signal, pure or Qt: ``client.state_changed.connect(self.connection_changed)``.

As with a Qt direct connection, ``emit`` calls every slot at once, in the order they were connected. A
slot that raises does not stop the others: its exception goes to ``sys.excepthook`` (Krita shows it,
tests see it). A slot whose Qt object was deleted (PyQt raises ``RuntimeError: wrapped C/C++ object
... has been deleted``) is dropped, as Qt disconnects a destroyed receiver: a docker whose window was
closed never breaks the one controller every window shares.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol, overload

Slot = Callable[..., Any]


def _deleted_qt_object(exc: RuntimeError) -> bool:
    text = str(exc)
    return "C/C++ object" in text and "deleted" in text


class BoundSignal:
    """One object's signal: the slots connected to it."""

    __slots__ = ("_name", "_slots")

    def __init__(self, name: str = "signal") -> None:
        self._name = name
        self._slots: list[Slot] = []

    def connect(self, slot: Slot) -> None:
        if not callable(slot):
            raise TypeError(f"{self._name}.connect() needs a callable, not {type(slot).__name__}")
        self._slots.append(slot)

    def disconnect(self, slot: Slot | None = None) -> None:
        """Disconnect ``slot`` (its earliest connection), or every slot when none is named. Disconnecting
        a slot that is not connected raises TypeError, as in PyQt."""
        if slot is None:
            self._slots.clear()
            return
        for index, connected in enumerate(self._slots):
            if connected == slot:
                del self._slots[index]
                return
        raise TypeError(f"{self._name}.disconnect(): the slot is not connected")

    def emit(self, *args: Any) -> None:
        for slot in list(self._slots):  # a slot may connect or disconnect others meanwhile
            try:
                slot(*args)
            except RuntimeError as exc:
                if _deleted_qt_object(exc):
                    self._drop(slot)
                else:
                    sys.excepthook(type(exc), exc, exc.__traceback__)
            except Exception as exc:
                sys.excepthook(type(exc), exc, exc.__traceback__)

    __call__ = emit  # a signal is a slot too

    def receivers(self) -> int:
        return len(self._slots)

    def _drop(self, slot: Slot) -> None:
        self._slots = [s for s in self._slots if s is not slot]

    def __repr__(self) -> str:
        return f"<signal {self._name}, {len(self._slots)} slot(s)>"


class Signal:
    """Declared in a class body: ``changed = Signal(str)`` (the types only document what ``emit`` sends)."""

    def __init__(self, *types: Any) -> None:
        self.types = types
        self._name = "signal"

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Signal: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> BoundSignal: ...
    def __get__(self, instance: object | None, owner: type | None = None) -> Signal | BoundSignal:
        if instance is None:
            return self
        bound = instance.__dict__.get(self._name)
        if bound is None:
            bound = instance.__dict__[self._name] = BoundSignal(f"{type(instance).__name__}.{self._name}")
        return bound


class SignalLike(Protocol):
    """What the workflow needs of a signal it is given: a :class:`BoundSignal` or a PyQt bound signal."""

    def connect(self, slot: Any) -> Any: ...
    def disconnect(self, slot: Any = ...) -> Any: ...
    def emit(self, *args: Any) -> Any: ...
