"""The programs the plugin runs, as the workflow sees them: the local backend, the setup's commands and
the computer's inspection (``adapters.backend`` and ``adapters.setup_probe`` implement them with QProcess).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from krita_sdxl.backend.setup.plan import pythons
from krita_sdxl.backend.setup.plan.machine import Machine

from .signals import SignalLike

_PYTHON = re.compile(r"^(python|pythonw|py)(\d+(\.\d+)*)?(\.exe)?$", re.IGNORECASE)
CLI_MODULE = "krita_sdxl.backend.cli"


def is_python(command: str) -> bool:
    """``python3``, ``/venv/bin/python``, ``C:\\venv\\Scripts\\python.exe``: a Python (whichever the OS)."""
    return bool(_PYTHON.match(re.split(r"[\\/]", command.strip())[-1]))


def cli_program(command: str) -> list[str]:
    """How to run the krita-sdxl CLI with ``command``: the program itself, or a Python with ``-m``."""
    command = command.strip()
    return [command, "-m", CLI_MODULE] if is_python(command) else [command]


class BackendState(str, Enum):
    stopped = "stopped"
    starting = "starting"
    running = "running"
    stopping = "stopping"
    failed = "failed"


class LocalBackend(Protocol):
    """The backend service Krita starts: ``state_changed(state, detail)``, ``output(text)``."""

    state_changed: SignalLike
    output: SignalLike

    @property
    def state(self) -> BackendState: ...
    @property
    def detail(self) -> str: ...
    def log_tail(self, lines: int = 30) -> str: ...
    def start(self, command: str, args: str, endpoint: str, extra: Sequence[str] = ()) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...


class Command(Protocol):
    """One program run: ``line(text)`` per output line, ``done(code, output)`` once (code None: it did
    not start; -1: it crashed or was killed)."""

    line: SignalLike
    done: SignalLike

    @property
    def running(self) -> bool: ...
    def start(self) -> None: ...
    def kill(self) -> None: ...


@dataclass
class Facts:
    """What the inspection found on this computer."""

    machine: Machine
    found: list[pythons.PythonInfo] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # why a Python that ran is not usable


class Inspector(Protocol):
    """Finds the Pythons and the GPU: ``progress(text)`` while it looks, ``finished(Facts)`` at the end."""

    progress: SignalLike
    finished: SignalLike

    def start(self) -> None: ...
    def cancel(self) -> None: ...


class Processes(Protocol):
    """Makes the setup's commands and inspections (not started yet)."""

    def command(self, argv: Sequence[str], env: Mapping[str, str], timeout_ms: int = 0) -> Command: ...
    def inspector(self, env: Mapping[str, str], system: str) -> Inspector: ...
