"""The docker's Set up / Update / Repair: check the computer, show the plan, run its steps one program at a time.

``check()`` finds a Python and the GPU (an inspector from the ``Processes`` port; ``adapters.setup_probe`` runs
it with QProcess) and builds the plan (``setup_plan.steps``):
nothing is written or downloaded. ``run(mode)`` runs the pending steps one command at a time, every
line into ``setup.log`` in the setup folder; a step is marked incomplete in the state file before it
starts and complete after its checks pass, so a cancelled or failed step is redone next time (a venv
this run created is removed again). The last step starts the environment's ``krita-sdxl serve`` as
Krita's local backend.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from krita_sdxl.backend.setup.plan import events, failures, hub, procenv, pythons, steps, torch_builds
from krita_sdxl.backend.setup.plan.failures import Failure
from krita_sdxl.backend.setup.plan.space import check_space, human
from krita_sdxl.backend.setup.plan.steps import Plan, Step

from ..core.host import Timers
from ..core.processes import Command, Facts, Inspector, LocalBackend, Processes
from ..core.signals import Signal

PLUGIN_DIR = Path(__file__).resolve().parents[1]  # the plugin's folder, which carries the backend wheel
TORCH_INDEX_ENV = "KRITA_SDXL_TORCH_INDEX"
FOLDER_NAME = "krita-sdxl-backend"


class SetupRunner:
    changed = Signal()  # phase, plan, step states, progress: the view redraws
    output = Signal(str)  # a line of a step's output
    finished = Signal(bool, str)  # a run ended: ok, message for people

    def __init__(
        self,
        backend: LocalBackend,
        start_service: Callable[[str], None],
        processes: Processes,
        timers: Timers,
        app_data: Path,
    ) -> None:
        self.backend = backend
        self._start_service = start_service
        self._processes = processes
        self._timers = timers
        self.app_data = Path(app_data)  # Krita's application data (``%APPDATA%\\krita``, ``~/.local/share/krita``...)
        self.system = platform.system()
        self.env = procenv.clean_env(os.environ, self.system)
        self.folder = self.default_folder
        self.include_base = False
        self.torch_build = "auto"
        self.phase = "idle"  # checking, ready, blocked, running, done, failed, cancelled
        self.facts: Facts | None = None
        self.plan: Plan | None = None
        self.problem: torch_builds.SetupProblem | None = None
        self.failure: Failure | None = None
        self.message = ""
        self.status: dict[str, str] = {}  # step key -> pending, running, done, failed, cancelled
        self.progress: tuple[int, int] | None = None  # bytes (done, total) of the download; None: busy
        self.detail = ""  # the running step's latest line
        self.warnings: list[str] = []
        self._inspector: Inspector | None = None
        self._after_check: Callable[[], None] | None = None
        self._todo: list[Step] = []
        self._step: Step | None = None
        self._commands: list[tuple[str, ...]] = []
        self._command: Command | None = None
        self._outputs: list[str] = []
        self._cancelling = False
        self._venv_existed = True
        self._log: TextIO | None = None
        self._set_up = False
        self._started = False
        self._shown_at = 0.0

    # --- public -------------------------------------------------------------------------------

    @property
    def default_folder(self) -> Path:
        """Where the backend goes unless the artist picks a folder: in Krita's application data."""
        return self.app_data / FOLDER_NAME

    def folder_of(self, setting: str) -> Path:
        """The folder a setting names ("" = the default one)."""
        return Path(setting).expanduser() if setting.strip() else self.default_folder

    @property
    def busy(self) -> bool:
        return self.phase in ("checking", "running")

    @property
    def log_path(self) -> Path:
        return self.folder / steps.LOG_FILE

    @property
    def set_up(self) -> bool:
        """The folder holds a finished setup (read when the folder is set and after a run)."""
        return self._set_up

    @property
    def started(self) -> bool:
        """The folder holds at least one finished step (something for Repair to redo)."""
        return self._started

    def configure(self, folder: Path, include_base: bool, torch_build: str) -> None:
        if self.busy:
            return
        self.folder, self.include_base, self.torch_build = Path(folder), include_base, torch_build
        self._set_up, self._started = steps.is_set_up(self.folder), bool(steps.read_state(self.folder))
        if self.facts is not None:
            self._make_plan("install")
        self.changed.emit()  # another folder may be set up already: Update instead of Set up

    def check(self, then: Callable[[], None] | None = None) -> None:
        """Find a Python and the GPU, then build the plan (nothing is written)."""
        if self.busy:
            return
        self._after_check = then
        self.phase, self.failure, self.message, self.detail = "checking", None, "", ""
        self.changed.emit()
        self._inspector = self._processes.inspector(self.env, self.system)
        self._inspector.progress.connect(self._on_probe_progress)
        self._inspector.finished.connect(self._on_facts)
        self._inspector.start()

    def run(self, mode: str = "install") -> None:
        """Look at the computer again (a new driver, a freed disk), then run the pending steps
        (``install``: Set up and Update) or all of them (``repair``)."""
        if not self.busy:
            self.check(then=lambda: self._run(mode))

    def _run(self, mode: str) -> None:
        if not self._make_plan(mode) or self.plan is None:
            self.changed.emit()
            return
        space = check_space(self.plan.needs)
        if space:
            self.problem = torch_builds.SetupProblem(space[0], "")
            self.phase = "blocked"
            self.changed.emit()
            return
        self.phase, self.failure, self._cancelling = "running", None, False
        self._todo = list(self.plan.pending)
        self.status = {s.key: ("pending" if s.pending else "done") for s in self.plan.steps}
        self._open_log(mode)
        self.changed.emit()
        if self.backend.state.value in ("starting", "running"):  # its files are about to be replaced
            self._say("Stopping the running backend first.")
            self.backend.state_changed.connect(self._after_stop)
            self.backend.stop()
            return
        self._next_step()

    def cancel(self) -> None:
        if self.phase == "checking" and self._inspector is not None:
            self._inspector.cancel()
            return
        if self.phase != "running" or self._cancelling:
            return
        self._cancelling = True
        if self._command is not None and self._command.running:
            self._command.kill()  # _on_done ends the step as cancelled
        elif self._step is not None and self._step.key == "service":
            self.backend.stop()
            self._end_cancelled()

    def log_text(self, chars: int = 100_000) -> str:
        try:
            with self.log_path.open("r", encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return f"(no log yet: {self.log_path})"

    # --- checking -----------------------------------------------------------------------------

    def _on_probe_progress(self, text: str) -> None:
        self.detail = text
        self.changed.emit()

    def _on_facts(self, facts: Facts) -> None:
        self.facts, self._inspector = facts, None
        self._make_plan("install")
        self.changed.emit()
        then, self._after_check = self._after_check, None
        if then is not None and self.phase == "ready":
            then()

    def _make_plan(self, mode: str) -> bool:
        assert self.facts is not None
        self.plan, self.problem = None, None
        try:
            python = pythons.choose(self.facts.found, self.system)
            if python is None:
                raise torch_builds.SetupProblem("No usable Python 3.10 or newer was found.",
                                                pythons.install_advice(self.system, self.facts.rejected))  # fmt: skip
            index = self.env.get(TORCH_INDEX_ENV) or None
            torch = torch_builds.choose_torch(self.facts.machine, self.torch_build, index)
            backend = steps.find_backend(PLUGIN_DIR, self.env)
        except torch_builds.SetupProblem as exc:
            self.problem, self.phase = exc, "blocked"
            return False
        cache = hub.hf_cache_dir(self.env)
        models = hub.models(self.include_base)
        ready = {m.repo: hub.snapshot_ready(cache, m.repo) for m in models}
        done = steps.done_steps(self.folder, self.system)
        self.plan = steps.build_plan(self.folder, self.system, python, self.facts.machine, torch, backend, models,
                                     ready, cache, done, mode)  # fmt: skip
        self.warnings = list(self.plan.warnings)
        self.status = {s.key: ("pending" if s.pending else "done") for s in self.plan.steps}
        self.phase = "ready"
        return True

    # --- running ------------------------------------------------------------------------------

    def _after_stop(self, state: str, _detail: str) -> None:
        if state in ("stopped", "failed"):
            self.backend.state_changed.disconnect(self._after_stop)
            if self._cancelling:
                self._end_cancelled()
            else:
                self._timers.later(0, self._next_step)  # after the backend has finished with its old process

    def _next_step(self) -> None:
        assert self.plan is not None
        if not self._todo:
            self._end(True, "The local backend is set up and running.")
            return
        step = self._step = self._todo.pop(0)
        self.status[step.key] = "running"
        self.progress, self.detail = None, ""
        self._say(f"== {step.title}: {step.detail}")
        self.changed.emit()
        if step.key == "service":
            self.backend.state_changed.connect(self._on_service_state)
            self._start_service(self.plan.python)
            return
        steps.mark(self.folder, step.key, None, self.plan.python)
        if step.key == "venv":
            self._venv_existed = self.plan.venv.exists()
        self._commands, self._outputs = list(step.commands), []
        self._run_next_command()

    def _run_next_command(self) -> None:
        if not self._commands:
            self._step_succeeded()
            return
        argv = self._commands.pop(0)
        self._say("$ " + shlex.join(argv))
        self._command = self._processes.command(argv, self.env)
        self._command.line.connect(self._on_line)
        self._command.done.connect(self._on_done)
        self._command.start()

    def _on_line(self, line: str) -> None:
        self._write(line)
        self.output.emit(line)
        event = events.parse(line) if self._step is not None and self._step.key == "models" else None
        if event is None:
            if line.strip():
                self.detail = line.strip()[:200]
        elif event["event"] == "plan":
            self.progress = (0, int(event["needed"]))
            self.detail = f"{human(event['needed'])} to download of {human(event['total'])}"
        elif event["event"] == "progress":
            self.progress = (int(event["done"]), int(event["needed"]))
            self.detail = f"Downloaded {human(event['done'])} of {human(event['needed'])}"
        elif event["event"] in ("file", "verify"):
            verb = "Downloading" if event["event"] == "file" else "Checking"
            self.detail = f"{verb} {event['name']}"
        now = time.monotonic()
        if now - self._shown_at >= 0.1:  # pip writes hundreds of lines: the view redraws ten times a second
            self._shown_at = now
            self.changed.emit()

    def _on_done(self, code: object, output: str) -> None:
        self._command = None
        if self._cancelling:
            self._end_cancelled()
            return
        self._outputs.append(output)
        assert self._step is not None
        judged = not self._commands and self._step.key in ("torch", "backend")  # the check: judged on its output
        if code is None or (code != 0 and not judged):
            self._fail(failures.explain(self._step.key, self._step.title, code, output, str(self.log_path)))  # type: ignore[arg-type]
            return
        self._run_next_command()

    def _step_succeeded(self) -> None:
        assert self.plan is not None and self._step is not None
        step, last = self._step, self._outputs[-1] if self._outputs else ""
        problem = None
        if step.key == "torch":
            problem, warning = steps.judge_torch(last, self.plan.torch)
            if warning:
                self.warnings.append(warning)
                self._say("warning: " + warning)
        elif step.key == "backend":
            problem = steps.judge_backend(last)
        if problem:
            self._fail(Failure(step.title, problem + ".", f"Click Repair. The output is in {self.log_path}."))
            return
        steps.mark(self.folder, step.key, step.fingerprint or steps.ALWAYS, self.plan.python)
        self.status[step.key] = "done"
        self._next_step()

    def _on_service_state(self, state: str, detail: str) -> None:
        if state not in ("running", "failed", "stopped"):
            return
        self.backend.state_changed.disconnect(self._on_service_state)
        if self._cancelling:
            return
        if state == "running":
            self.status["service"] = "done"
            self._next_step()
            return
        self._say(self.backend.log_tail(60))
        why = f"{detail}: {self.backend.log_tail(3).strip()[-300:]}"
        self._fail(Failure("Start the backend", why, "Its output is in the log; click Repair once it is fixed."))

    def _rollback(self) -> None:
        if self._step is not None and self._step.key == "venv" and not self._venv_existed and self.plan is not None:
            shutil.rmtree(self.plan.venv, ignore_errors=True)  # a half-made environment is no use

    def _fail(self, failure: Failure) -> None:
        self.failure = failure
        if self._step is not None:
            self.status[self._step.key] = "failed"
        self._rollback()
        self._say("FAILED: " + failure.text)
        self._end(False, failure.text, phase="failed")

    def _end_cancelled(self) -> None:
        if self.phase != "running":
            return
        step = self._step
        if step is not None:
            self.status[step.key] = "cancelled"
        self._rollback()
        where = f"“{step.title}” was not finished" if step is not None else "nothing was changed"
        self._end(False, f"Cancelled: {where}. Set up continues from there next time (a download resumes).",
                  phase="cancelled")  # fmt: skip

    def _end(self, ok: bool, message: str, phase: str = "done") -> None:
        self.phase, self.message, self.progress = phase, message, None
        self._set_up, self._started = steps.is_set_up(self.folder), bool(steps.read_state(self.folder))
        self._step, self._todo, self._commands = None, [], []
        self._say(message)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.changed.emit()
        self.finished.emit(ok, message)

    # --- the log ------------------------------------------------------------------------------

    def _open_log(self, mode: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a", encoding="utf-8")
        assert self.plan is not None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write(f"\n===== {stamp}: {mode} =====\n{self.plan.describe()}")

    def _write(self, text: str) -> None:
        if self._log is not None:
            self._log.write(text + "\n")
            self._log.flush()

    def _say(self, text: str) -> None:
        self._write(text)
        self.output.emit(text)

    def describe(self) -> dict[str, Any]:
        """For tests and the view: the phase and each step's state."""
        return {"phase": self.phase, "status": dict(self.status), "message": self.message}
