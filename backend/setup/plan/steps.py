"""The setup's steps, what each will run and download, and which still need to run.

A setup folder (shown to the person, changeable) holds ``venv/`` (the backend's Python environment),
``setup.log`` (every command and its output) and ``setup-state.json``: the steps that completed, each
with a fingerprint of what it did. A step is marked incomplete before it starts and complete after it
succeeded, so a cancelled or failed step is redone by the next run; a completed one is skipped while
its fingerprint still matches (Set up and Update), or redone anyway (Repair). The models land in the
Hugging Face cache, shared with other tools.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PureWindowsPath

from .hub import ModelSpec
from .machine import Machine
from .pythons import PythonInfo
from .space import Need, human
from .torch_builds import OTHER_PACKAGES, SetupProblem, TorchChoice
from .version import VERSION

BACKEND_WHEEL_ENV = "KRITA_SDXL_BACKEND_WHEEL"  # a krita-sdxl wheel (or source folder) to install instead
WHEELS_DIR = "_wheels"  # in the plugin's folder: the backend wheel packaging/build_plugin.py put there
STATE_FILE = "setup-state.json"
LOG_FILE = "setup.log"
VENV = "venv"
STATE_FORMAT = 1
ALWAYS = "always"  # recorded for a step without a fingerprint (a source folder): done, yet run every time
MODES = ("install", "repair")  # install: Set up and Update (what is missing or stale); repair: every step
KEYS = ("venv", "torch", "backend", "models", "service")
CLI = ("-m", "krita_sdxl.backend.cli")
PIP_INSTALL = ("-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-cache-dir",
               "--progress-bar", "off")  # fmt: skip
TORCH_CHECK = (
    "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
    "'hip': getattr(torch.version, 'hip', None), 'gpu': torch.cuda.is_available(), "
    "'mps': torch.backends.mps.is_available()}))"
)


def venv_dir(folder: Path) -> Path:
    return Path(folder) / VENV


def venv_python(venv: Path | str, system: str) -> str:
    """The environment's interpreter: ``Scripts\\python.exe`` on Windows, ``bin/python`` elsewhere."""
    if system == "Windows":
        return str(PureWindowsPath(str(venv), "Scripts", "python.exe"))
    return str(Path(venv) / "bin" / "python")


@dataclass(frozen=True)
class BackendSource:
    """What pip installs as the backend: the wheel built with this plugin (or a source folder)."""

    path: str
    fingerprint: str | None  # the wheel's SHA-256; None for a folder (always reinstalled)


def wheel_name(version: str = VERSION) -> str:
    return f"krita_sdxl-{version}-py3-none-any.whl"


def find_backend(plugin_dir: Path, env: Mapping[str, str]) -> BackendSource:
    """What to install as the backend: ``$KRITA_SDXL_BACKEND_WHEEL``, else the wheel the plugin carries
    (its own version), else, run from a source checkout, that checkout. SetupProblem when none."""
    named = env.get(BACKEND_WHEEL_ENV, "").strip()
    if named:
        path = Path(named).expanduser()
        if path.is_file() and path.suffix == ".whl":
            return BackendSource(str(path), _sha256(path))
        if path.is_dir() and (path / "pyproject.toml").is_file():
            return BackendSource(str(path), None)
        raise SetupProblem(f"{BACKEND_WHEEL_ENV}={named} is neither a .whl file nor a source folder.",
                           "Point it at a krita-sdxl wheel, or unset it.")  # fmt: skip
    wheel = Path(plugin_dir) / WHEELS_DIR / wheel_name()
    if wheel.is_file():
        return BackendSource(str(wheel), _sha256(wheel))
    checkout = Path(plugin_dir).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "backend" / "setup" / "plan").is_dir():
        return BackendSource(str(checkout), None)
    raise SetupProblem(
        f"This copy of the plugin carries no backend to install (no {WHEELS_DIR}/{wheel_name()}).",
        f"Install the plugin zip from the release, which carries it, or set {BACKEND_WHEEL_ENV} to a krita-sdxl "
        f"{VERSION} wheel.",
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Step:
    key: str  # one of KEYS
    title: str
    detail: str  # what it will do, for people
    commands: tuple[tuple[str, ...], ...]  # run in order, each must exit 0; empty for "service"
    fingerprint: str | None  # recorded when done; None: always runs
    download_bytes: int = 0
    pending: bool = True


@dataclass(frozen=True)
class Plan:
    folder: Path
    system: str
    python: str  # the environment's interpreter: the backend command once set up
    base: PythonInfo  # the Python the environment is made with
    machine: Machine
    torch: TorchChoice
    models: tuple[ModelSpec, ...]
    steps: tuple[Step, ...]
    needs: tuple[Need, ...]
    warnings: tuple[str, ...] = field(default=())

    @property
    def venv(self) -> Path:
        return venv_dir(self.folder)

    @property
    def pending(self) -> list[Step]:
        return [s for s in self.steps if s.pending]

    @property
    def download_bytes(self) -> int:
        return sum(s.download_bytes for s in self.pending)

    def step(self, key: str) -> Step:
        return next(s for s in self.steps if s.key == key)

    def describe(self) -> str:
        """What the setup will do, for people, before anything runs."""
        lines = [f"This computer: {self.machine.summary}.", f"Python: {self.base.label}.",
                 f"PyTorch: {self.torch.label}, because {self.torch.reason}."]  # fmt: skip
        lines += [f"⚠ {w}" for w in self.warnings]
        lines.append(f"Folder: {self.folder}")
        for step in self.steps:
            mark = "•" if step.pending else "✓"
            size = f" (downloads about {human(step.download_bytes)})" if step.pending and step.download_bytes else ""
            lines.append(f"{mark} {step.title}{size}: {step.detail}" + ("" if step.pending else " (done)"))
        total = self.download_bytes
        lines.append(f"In all it downloads about {human(total)}." if total else "Nothing to download.")
        disk = [f"{human(n.bytes)} for {n.what} ({n.path})" for n in self.needs if n.bytes]
        if disk:
            lines.append("Disk space it needs: " + ", ".join(disk) + ".")
        return "\n".join(lines)


def build_plan(
    folder: Path,
    system: str,
    base: PythonInfo,
    machine: Machine,
    torch: TorchChoice,
    backend: BackendSource,
    models: Sequence[ModelSpec],
    models_ready: Mapping[str, bool],
    hf_cache: Path,
    done: Mapping[str, str],
    mode: str = "install",
) -> Plan:
    """Every step, each marked pending or not for ``mode`` given ``done`` (the state file's steps)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    folder = Path(folder)
    venv = venv_dir(folder)
    py = venv_python(venv, system)
    venv_fp = f"{base.executable}|{base.short}"
    venv_args = [base.executable, "-m", "venv"]
    if done.get("venv") not in (None, venv_fp):
        venv_args.append("--clear")  # another Python: the old packages are of no use
    torch_fp = f"{venv_fp}|{torch.requirement}|{torch.index_url or 'pip config'}"
    backend_fp = f"{venv_fp}|{VERSION}|{backend.fingerprint}" if backend.fingerprint else None
    download = sum(m.approx_bytes for m in models if not models_ready.get(m.repo))
    names = " and ".join(m.title for m in models)
    fetch = [*CLI, "setup", "download", "--json-progress"]
    fetch += ["--base"] if any(m.role == "base" for m in models) else []
    fetch += ["--verify"] if mode == "repair" else []
    where = "the PyTorch index" if torch.index_url else "pip's configured index"
    steps = [
        Step("venv", "Create the Python environment", f"{base.label} makes a virtual environment in {venv}",
             ((*venv_args, str(venv)),), venv_fp),
        Step("torch", f"Install {torch.label}", f"pip installs {torch.requirement} from "
             f"{torch.index_url or where}", ((py, *PIP_INSTALL, *torch.pip_args), (py, "-c", TORCH_CHECK)),
             torch_fp, torch.download_bytes),
        Step("backend", f"Install the krita-sdxl {VERSION} backend", f"pip installs {Path(backend.path).name} "
             "and what it needs (diffusers, transformers, ...)",
             ((py, *PIP_INSTALL, backend.path, torch.requirement),
              (py, *PIP_INSTALL, "--force-reinstall", "--no-deps", backend.path),
              (py, *CLI, "setup", "check", "--json")), backend_fp, OTHER_PACKAGES[0]),
        Step("models", f"Download the {names}", f"into the Hugging Face cache {hf_cache}; resumable, every file's "
             "size and checksum verified" + ("" if download else " (already there: checked)"),
             (tuple([py, *fetch]),), "|".join(m.repo for m in models), download),
        Step("service", "Start the backend", f"{py} -m krita_sdxl.backend.cli serve, as Krita's local backend",
             (), None),
    ]  # fmt: skip
    if mode == "install":
        steps = [replace(s, pending=s.fingerprint is None or done.get(s.key) != s.fingerprint) for s in steps]
        if download:  # a model went missing from the cache since
            steps[3] = replace(steps[3], pending=True)
    # A rebuilt environment needs its packages again.
    if steps[0].pending and "--clear" in steps[0].commands[0]:
        steps = [replace(s, pending=True) for s in steps]
    install = sum(b for s, b in ((steps[1], torch.install_bytes), (steps[2], OTHER_PACKAGES[1])) if s.pending)
    install += sum(s.download_bytes for s in steps[1:3] if s.pending)  # pip's downloads pass through
    needs = (
        Need(folder, install, "PyTorch and the backend", "choose another folder"),
        Need(hf_cache, download if steps[3].pending else 0, names,
             "set HF_HOME to a folder on another disk before starting Krita"),
    )  # fmt: skip
    warnings = (torch.warning,) if torch.warning else ()
    return Plan(folder, system, py, base, machine, torch, tuple(models), tuple(steps), needs, warnings)


# --- the state file -----------------------------------------------------------------------------


def read_state(folder: Path) -> dict[str, str]:
    """The completed steps and their fingerprints ({} when there is no readable state file)."""
    try:
        data = json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, dict):
        return {}
    return {k: v for k, v in steps.items() if isinstance(k, str) and isinstance(v, str)}


def write_state(folder: Path, steps: Mapping[str, str], python: str = "") -> None:
    """Replace the state file atomically (a crash leaves the old one or the new one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"format": STATE_FORMAT, "version": VERSION, "python": python, "steps": dict(steps)}
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / STATE_FILE)


def mark(folder: Path, key: str, fingerprint: str | None, python: str = "") -> dict[str, str]:
    """Record ``key`` as done with ``fingerprint``, or (None) as not done; returns the new state."""
    steps = read_state(folder)
    steps.pop(key, None)
    if fingerprint is not None:
        steps[key] = fingerprint
    write_state(folder, steps, python)
    return steps


def done_steps(folder: Path, system: str) -> dict[str, str]:
    """The state file's steps, less those whose environment is gone (deleted by hand)."""
    done = read_state(folder)
    if not Path(venv_python(venv_dir(folder), system)).is_file():
        for key in ("venv", "torch", "backend"):
            done.pop(key, None)
    return done


def is_set_up(folder: Path) -> bool:
    """Every recorded step of a complete setup is there (the plugin offers Update instead of Set up)."""
    done = read_state(folder)
    return all(k in done for k in ("venv", "torch", "backend", "models"))


# --- reading the checks' answers ----------------------------------------------------------------


def last_json(output: str) -> dict | None:
    for text in reversed(output.strip().splitlines()):
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


def judge_torch(output: str, choice: TorchChoice) -> tuple[str | None, str | None]:
    """(failure, warning) from the torch check's output: it must import; a GPU build should see the GPU."""
    data = last_json(output)
    if data is None or "torch" not in data:
        return "PyTorch was installed but does not import (its output is in the log)", None
    if choice.device in ("cuda", "rocm") and not data.get("gpu"):
        return None, (
            f"PyTorch {data['torch']} is installed but does not see the GPU (driver problem?); the backend "
            "would run on the CPU. Update the GPU driver, restart the computer and click Repair."
        )
    if choice.device == "mps" and not data.get("mps"):
        return None, f"PyTorch {data['torch']} is installed but MPS is not available (macOS 12.3 or newer needed)."
    return None, None


def judge_backend(output: str) -> str | None:
    """None when ``krita-sdxl setup check --json`` says the backend imports and is this plugin's version."""
    data = last_json(output)
    if data is None or "backend_version" not in data:
        return "the installed backend does not run (its output is in the log)"
    if data["backend_version"] != VERSION:
        return f"the installed backend is version {data['backend_version']}, this plugin needs {VERSION}"
    problems = data.get("problems") or []
    return "; ".join(map(str, problems)) or None
