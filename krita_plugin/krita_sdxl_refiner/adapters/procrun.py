"""One command run with ``QProcess``, line by line, without blocking Krita's UI (the setup's steps and probes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PyQt5.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, pyqtSignal

KEPT_CHARS = 200_000  # of a command's output, for explaining a failure (the log file has it all)


def merged_process(parent: QObject, env: Mapping[str, str], owner: QObject) -> QProcess:
    """A QProcess with exactly ``env``, stdout and stderr merged, wired to ``owner``'s ``_read``,
    ``_error`` and ``_finished`` slots (the one way the plugin starts a program)."""
    proc = QProcess(parent)
    environment = QProcessEnvironment()
    for key, value in env.items():
        environment.insert(key, value)
    proc.setProcessEnvironment(environment)
    proc.setProcessChannelMode(QProcess.MergedChannels)
    proc.readyReadStandardOutput.connect(owner._read)  # type: ignore[attr-defined]
    proc.errorOccurred.connect(owner._error)  # type: ignore[attr-defined]
    proc.finished.connect(owner._finished)  # type: ignore[attr-defined]
    return proc


class Command(QObject):
    """The workflow's ``core.processes.Command``: ``start()`` runs ``argv`` with ``env``;
    ``line`` carries each output line (stdout and stderr merged); ``done`` the exit code (None: it did not
    start; -1: it crashed or was killed, see ``killed``) and the output."""

    line = pyqtSignal(str)
    done = pyqtSignal(object, str)

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], timeout_ms: int = 0, parent: QObject | None = None
    ) -> None:
        super().__init__(parent)
        self.argv = list(argv)
        self._env = dict(env)
        self._timeout_ms = timeout_ms
        self._process: QProcess | None = None
        self._partial = ""
        self._output: list[str] = []
        self._size = 0
        self._ended = False
        self.killed = False

    @property
    def running(self) -> bool:
        return self._process is not None and not self._ended

    @property
    def output(self) -> str:
        return "\n".join(self._output)

    def start(self) -> None:
        proc = merged_process(self, self._env, self)
        self._process = proc
        if self._timeout_ms:
            QTimer.singleShot(self._timeout_ms, self.kill)
        proc.start(self.argv[0], self.argv[1:])

    def kill(self) -> None:
        if self.running and self._process is not None and self._process.state() != QProcess.NotRunning:
            self.killed = True
            self._process.kill()

    def _read(self) -> None:
        if self._process is None:
            return
        text = self._partial + bytes(self._process.readAllStandardOutput()).decode("utf-8", "replace")
        *lines, self._partial = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for line in lines:
            self._keep(line)
            self.line.emit(line)

    def _keep(self, line: str) -> None:
        self._output.append(line)
        self._size += len(line) + 1
        while self._size > KEPT_CHARS and len(self._output) > 1:
            self._size -= len(self._output.pop(0)) + 1

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.FailedToStart and not self._ended and self._process is not None:
            self._ended = True
            message = self._process.errorString()
            self._keep(message)
            self.done.emit(None, message)

    def _finished(self, code: int, status: QProcess.ExitStatus) -> None:
        if self._ended:
            return
        self._read()
        if self._partial:
            self._keep(self._partial)
            self.line.emit(self._partial)
            self._partial = ""
        self._ended = True
        self.done.emit(-1 if status == QProcess.CrashExit or self.killed else code, self.output)
