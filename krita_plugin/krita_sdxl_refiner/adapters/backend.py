"""Start and stop a local backend service from the docker (a ``QProcess``; never blocks the UI).

The command is either the ``krita-sdxl`` program or a Python interpreter that has the ``krita-sdxl``
package installed (then ``-m krita_sdxl.backend.cli`` runs the same CLI). The service prints "ready" once it listens;
until then the state is "starting". Its merged output is kept (last lines) to show when it fails.
It starts without Krita's Python variables (``setup_plan.procenv``): they would break another Python.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
from collections import deque
from collections.abc import Sequence

from PyQt5.QtCore import QObject, QProcess, QTimer, pyqtSignal

from krita_sdxl.backend.setup.plan.procenv import clean_env

from ..core.processes import BackendState, cli_program
from ..core.processes import is_python as is_python  # (tests and callers import it from here)
from .procrun import merged_process

READY_PATTERN = re.compile(r"\bready\b", re.IGNORECASE)
LOG_LINES = 200


def split_args(text: str) -> list[str]:
    return shlex.split(text, posix=os.name != "nt")


def invocation(command: str, args: str, endpoint: str, extra: Sequence[str] = ()) -> tuple[str, list[str]]:
    """Program and arguments for QProcess. ``--endpoint`` is added when the arguments lack one, so
    the local service listens where the plugin connects; ``extra`` follows the arguments (list items:
    no quoting, so a path with spaces arrives whole on every OS)."""
    command = command.strip()
    if not command:
        raise ValueError("no backend command is set: enter the krita-sdxl command or a Python that has it")
    argv = split_args(args)
    if argv and argv[0] == "serve" and not any(a == "--endpoint" or a.startswith("--endpoint=") for a in argv):
        argv += ["--endpoint", endpoint]
    program, *head = cli_program(command)
    return program, [*head, *argv, *extra]


class Backend(QObject):
    """The workflow's ``core.processes.LocalBackend``, run with QProcess."""

    state_changed = pyqtSignal(str, str)  # state, detail for people
    output = pyqtSignal(str)  # new log text

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._process: QProcess | None = None
        self._state = BackendState.stopped
        self._detail = ""
        self._log: deque[str] = deque(maxlen=LOG_LINES)
        self._partial = ""

    @property
    def state(self) -> BackendState:
        return self._state

    @property
    def detail(self) -> str:
        return self._detail

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(list(self._log)[-lines:] + ([self._partial] if self._partial else []))

    def start(self, command: str, args: str, endpoint: str, extra: Sequence[str] = ()) -> None:
        if self._process is not None and self._state in (BackendState.starting, BackendState.running):
            return
        try:
            program, argv = invocation(command, args, endpoint, extra)
        except ValueError as exc:
            self._set(BackendState.failed, str(exc))
            return
        self._log.clear()
        self._partial = ""
        self._log.append("$ " + " ".join(shlex.quote(a) for a in [program, *argv]))
        proc = merged_process(self, clean_env(os.environ, platform.system()), self)
        self._process = proc
        self._set(BackendState.starting, f"starting {os.path.basename(program)}…")
        proc.start(program, argv)

    def stop(self, grace_ms: int = 5000) -> None:
        proc = self._process
        if proc is None or proc.state() == QProcess.NotRunning:
            return
        self._set(BackendState.stopping, "stopping…")
        proc.terminate()
        QTimer.singleShot(grace_ms, lambda: self._kill_if_running(proc))

    def kill(self) -> None:
        """For Krita's exit: do not leave a GPU process behind."""
        proc = self._process
        if proc is not None and proc.state() != QProcess.NotRunning:
            proc.kill()
            proc.waitForFinished(2000)

    def _kill_if_running(self, proc: QProcess) -> None:
        if proc is self._process and proc.state() != QProcess.NotRunning:
            proc.kill()

    def _read(self) -> None:
        proc = self._process
        if proc is None:
            return
        text = self._partial + bytes(proc.readAllStandardOutput()).decode("utf-8", "replace")
        *lines, self._partial = text.replace("\r\n", "\n").split("\n")
        for line in lines:
            self._log.append(line)
            if self._state is BackendState.starting and READY_PATTERN.search(line):
                self._set(BackendState.running, "running")
        if lines:
            self.output.emit("\n".join(lines))

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.FailedToStart and self._process is not None:
            message = self._process.errorString()
            self._log.append(f"failed to start: {message}")
            self._set(BackendState.failed, f"could not start the backend: {message}")

    def _finished(self, code: int, status: QProcess.ExitStatus) -> None:
        self._read()
        if self._partial:
            self._log.append(self._partial)
            self._partial = ""
        self._process = None  # before telling anyone: a listener may start the next backend at once
        if self._state is BackendState.stopping:
            self._set(BackendState.stopped, "stopped")
        elif status == QProcess.CrashExit or code != 0:
            how = "crashed" if status == QProcess.CrashExit else f"exited with code {code}"
            self._set(BackendState.failed, f"the backend {how}")
        else:
            self._set(BackendState.stopped, "the backend exited")

    def _set(self, state: BackendState, detail: str) -> None:
        self._state, self._detail = state, detail
        self.state_changed.emit(state.value, detail)
