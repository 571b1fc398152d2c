"""What this computer has, found without blocking Krita: the Pythons (each candidate run with the
probe), the NVIDIA driver's CUDA version (``nvidia-smi``) and ROCm. The rules are in ``setup_plan``.
:class:`QtProcesses` hands the setup runner these inspections and its commands."""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Mapping, Sequence

from PyQt5.QtCore import QObject, pyqtSignal

from krita_sdxl.backend.setup.plan import machine, pythons
from krita_sdxl.backend.setup.plan.machine import Machine

from ..core.processes import Facts
from .procrun import Command

PROBE_TIMEOUT_MS = 20_000
SMI_TIMEOUT_MS = machine.NVIDIA_SMI_TIMEOUT_S * 1000


class Inspector(QObject):
    """The workflow's ``core.processes.Inspector``: ``start()``; ``finished(Facts)`` once
    every candidate and nvidia-smi have answered."""

    finished = pyqtSignal(object)
    progress = pyqtSignal(str)

    def __init__(self, env: Mapping[str, str], system: str | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.env = dict(env)
        self.system = system or platform.system()
        self.facts = Facts(Machine(self.system, machine.normalise_arch(platform.machine())))
        self._queue: list[pythons.Candidate] = []
        self._command: Command | None = None

    def _which(self, name: str) -> str | None:
        return shutil.which(name, path=self.env.get("PATH"))

    def start(self) -> None:
        self._queue = pythons.candidates(
            self.system, self.env, self._which, os.path.isfile, self.env.get("HOME") or os.path.expanduser("~")
        )
        self._next_python()

    def cancel(self) -> None:
        self._queue = []
        if self._command is not None:
            self._command.kill()

    def _run(self, argv: list[str], timeout_ms: int, on_done) -> None:  # type: ignore[no-untyped-def]
        self._command = Command(argv, self.env, timeout_ms, self)
        self._command.done.connect(on_done)
        self._command.start()

    def _next_python(self) -> None:
        if not self._queue:
            self._gpu()
            return
        candidate = self._queue.pop(0)
        self.progress.emit(f"Trying {' '.join(candidate.argv)} …")
        self._run([*candidate.argv, "-c", pythons.PROBE], PROBE_TIMEOUT_MS, self._probed)

    def _probed(self, code: object, output: str) -> None:
        info = pythons.parse_probe(output) if code == 0 else None
        if info is not None:
            if all(f.executable != info.executable for f in self.facts.found):
                self.facts.found.append(info)
                why = pythons.problem(info, self.system)
                if why:
                    self.facts.rejected.append(why)
        self._next_python()

    def _gpu(self) -> None:
        smi = self._which("nvidia-smi") if self.system != "Darwin" else None
        if smi is None:
            self._finish("")
            return
        self.progress.emit("Asking nvidia-smi …")
        self._run([smi], SMI_TIMEOUT_MS, lambda code, output: self._finish(output if code == 0 else ""))

    def _finish(self, smi_output: str) -> None:
        cuda, gpus = machine.parse_nvidia_smi(smi_output)
        m = self.facts.machine
        self.facts.machine = Machine(m.system, m.arch, cuda, gpus, machine.read_rocm(self.system))
        self._command = None
        self.finished.emit(self.facts)


class QtProcesses:
    """The workflow's ``core.processes.Processes``. What it makes is owned by one
    QObject, so a command is never deleted while it emits its own ``done``."""

    def __init__(self) -> None:
        self._owner = QObject()

    def command(self, argv: Sequence[str], env: Mapping[str, str], timeout_ms: int = 0) -> Command:
        return Command(argv, env, timeout_ms, self._owner)

    def inspector(self, env: Mapping[str, str], system: str) -> Inspector:
        return Inspector(env, system, self._owner)
