"""The docker's "Download upscaler": on a click only, the backend's ``krita-sdxl setup upscaler`` fetches
Real-ESRGAN x4plus into the models folder (resumable, SHA-256 checked: backend/setup/upscaler.py), with
progress read from its JSON lines; then it becomes the local backend's ``--upscaler``. It runs through the
same ``Processes`` port and the same progress events as Set up's model download. No Qt, no Krita."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from krita_sdxl.backend.setup.plan import events
from krita_sdxl.backend.setup.plan.space import human
from krita_sdxl.backend.setup.plan.upscalers import DEFAULT, UpscalerFile

from ..core.processes import Command, Processes, cli_program
from ..core.signals import Signal


class UpscalerDownload:
    changed = Signal()  # phase, progress or detail changed: the view redraws
    finished = Signal(bool, str)  # ok, message for people

    def __init__(self, processes: Processes, env: Callable[[], Mapping[str, str]]) -> None:
        self._processes, self._env = processes, env
        self.phase = "idle"  # running, done, failed, cancelled
        self.progress: tuple[int, int] | None = None  # bytes (done, needed)
        self.detail = ""
        self.path: Path | None = None
        self.file: UpscalerFile = DEFAULT
        self._error = ""
        self._command: Command | None = None

    @property
    def busy(self) -> bool:
        return self.phase == "running"

    def start(self, command: str, folder: Path, file: UpscalerFile | None = None) -> None:
        """Run the backend ``command`` (the krita-sdxl program, or a Python that has it) to fetch ``file``."""
        if self.busy:
            return
        self.file = file or DEFAULT
        argv = [*cli_program(command), "setup", "upscaler", "--dir", str(folder), "--json-progress", *self.file.argv()]
        self.phase, self.progress, self.path, self._error = "running", None, None, ""
        self.detail = f"Starting the download of {self.file.title} ({human(self.file.size)})…"
        self._command = self._processes.command(argv, self._env())
        self._command.line.connect(self._on_line)
        self._command.done.connect(self._on_done)
        self._command.start()
        self.changed.emit()

    def cancel(self) -> None:
        if self._command is not None and self._command.running:
            self.phase = "cancelled"
            self._command.kill()

    def _on_line(self, line: str) -> None:
        event = events.parse(line)
        if event is None:
            return
        kind = event["event"]
        if kind == "plan":
            self.progress = (0, int(event["needed"]))
        elif kind == "progress":
            self.progress = (int(event["done"]), int(event["needed"]))
            self.detail = f"Downloaded {human(event['done'])} of {human(event['needed'])}"
        elif kind == "verify":
            self.detail = f"Checking the SHA-256 of {event['name']}"
        elif kind == "done":
            self.path = Path(str(event["snapshot"]))
        elif kind == "error":
            self._error = f"{event.get('why', '')} {event.get('what', '')}".strip()
        self.changed.emit()

    def _on_done(self, code: object, output: str) -> None:
        self._command = None
        if self.phase == "cancelled":
            message = f"The download of {self.file.title} was cancelled; it continues where it stopped next time."
        elif code == 0 and self.path is not None:
            self.phase = "done"
            message = f"Downloaded {self.file.title} ({self.file.licence}), checksum verified: {self.path}."
        else:
            self.phase = "failed"
            last = (output.strip().splitlines() or [""])[-1][-300:]
            why = self._error or (f"the command could not start ({last})" if code is None else last)
            message = f"The download of {self.file.title} failed: {why}"
        self.detail = message
        self.changed.emit()
        self.finished.emit(self.phase == "done", message)
