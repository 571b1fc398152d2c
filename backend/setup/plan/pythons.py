"""Which Python builds the backend's environment, or which one to install.

Krita's own interpreter cannot: ``sys.executable`` inside Krita is Krita, and the Windows and macOS
builds embed a Python without ``venv``/``pip``. So the setup looks for a system Python 3.10+
(:func:`candidates`, per platform), runs each with :data:`PROBE` (the plugin with QProcess, the CLI
with subprocess), reads the answer (:func:`parse_probe`) and picks one (:func:`choose`); when none fits,
:func:`install_advice` says exactly what to install.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath

# Python versions PyTorch (and so the backend) ships wheels for: oldest, newest.
OLDEST = (3, 10)
NEWEST = (3, 14)
PREFERRED = ((3, 12), (3, 13), (3, 11), (3, 14), (3, 10))  # most wheels first
RECOMMENDED = "3.12"

# Printed as one JSON line by the candidate: enough to judge it without importing anything heavy.
PROBE = (
    "import json, platform, struct, sys, importlib.util as u; print(json.dumps({"
    "'version': list(sys.version_info[:3]), 'implementation': sys.implementation.name, "
    "'bits': struct.calcsize('P') * 8, 'executable': sys.executable, 'machine': platform.machine(), "
    "'venv': u.find_spec('venv') is not None, 'ensurepip': u.find_spec('ensurepip') is not None}))"
)


@dataclass(frozen=True)
class Candidate:
    argv: tuple[str, ...]  # how to run it: ("py", "-3.12") or ("/usr/bin/python3.12",)
    source: str  # for people: "Python launcher", "PATH", "python.org install"


@dataclass(frozen=True)
class PythonInfo:
    executable: str
    version: tuple[int, int, int]
    implementation: str = "cpython"
    bits: int = 64
    has_venv: bool = True
    has_ensurepip: bool = True
    machine: str = ""

    @property
    def short(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def label(self) -> str:
        return f"Python {'.'.join(map(str, self.version))} ({self.executable})"


def _versions() -> list[str]:
    return [f"{major}.{minor}" for major, minor in PREFERRED]


def candidates(
    system: str,
    env: Mapping[str, str],
    which: Callable[[str], str | None],
    exists: Callable[[str], bool],
    home: str = "",
) -> list[Candidate]:
    """Pythons to probe on ``system`` (``platform.system()``: Windows, Darwin, Linux), most wanted
    first, without duplicates. ``which`` searches PATH, ``exists`` tests a file (both injected, so
    every platform's rules can be tested anywhere)."""
    found: list[Candidate] = []

    def add(argv: tuple[str, ...] | None, source: str) -> None:
        if argv and argv[0] and all(c.argv != argv for c in found):
            found.append(Candidate(argv, source))

    def on_path(name: str, source: str = "PATH") -> None:
        path = which(name)
        if path and not _unusable(system, path):
            add((path,), source)

    def at(path: str, source: str) -> None:
        if exists(path):
            add((path,), source)

    if system == "Windows":
        launcher = which("py")
        if launcher and not _unusable(system, launcher):
            for v in _versions():
                add((launcher, f"-{v}"), "Python launcher")
        local = env.get("LOCALAPPDATA", "")
        programs = [p for p in (env.get("ProgramFiles", ""), env.get("ProgramW6432", "")) if p]
        for v in _versions():
            folder = "Python" + v.replace(".", "")
            if local:
                at(str(PureWindowsPath(local, "Programs", "Python", folder, "python.exe")), "python.org install")
            for root in programs:
                at(str(PureWindowsPath(root, folder, "python.exe")), "python.org install")
        on_path("python.exe")
        on_path("python3.exe")
    elif system == "Darwin":
        for v in _versions():
            at(f"/Library/Frameworks/Python.framework/Versions/{v}/bin/python{v}", "python.org install")
            at(f"/opt/homebrew/bin/python{v}", "Homebrew")
            at(f"/usr/local/bin/python{v}", "Homebrew or python.org")
            on_path(f"python{v}")
        if home:
            at(str(PurePosixPath(home, ".pyenv", "shims", "python3")), "pyenv")
        for path in ("/opt/homebrew/bin/python3", "/usr/local/bin/python3"):
            at(path, "Homebrew or python.org")
        on_path("python3")
    else:
        for v in _versions():
            on_path(f"python{v}")
        on_path("python3")
        for v in _versions():
            at(f"/usr/bin/python{v}", "system")
            at(f"/usr/local/bin/python{v}", "local install")
    return found


def _unusable(system: str, path: str) -> bool:
    """Pythons never probed: the Microsoft Store stubs and Store Python (its file-system redirection
    sends a venv under AppData somewhere else), and macOS's /usr/bin/python3 (Python 3.9, and
    running it without the Command Line Tools opens an install dialog)."""
    if system == "Windows":
        return "\\windowsapps\\" in path.lower().replace("/", "\\")
    if system == "Darwin":
        return path == "/usr/bin/python3"
    return False


def parse_probe(output: str) -> PythonInfo | None:
    """The :data:`PROBE` answer (the last JSON line of ``output``), or None when there is none."""
    for line in reversed(output.strip().splitlines()):
        try:
            data = json.loads(line)
            version = tuple(int(v) for v in data["version"])[:3]
            return PythonInfo(
                executable=str(data["executable"]),
                version=(*version, 0, 0, 0)[:3],  # type: ignore[arg-type]
                implementation=str(data.get("implementation", "")),
                bits=int(data.get("bits", 0)),
                has_venv=bool(data.get("venv")),
                has_ensurepip=bool(data.get("ensurepip")),
                machine=str(data.get("machine", "")),
            )
        except (ValueError, KeyError, TypeError):
            continue
    return None


def problem(info: PythonInfo, system: str = "") -> str | None:
    """Why ``info`` cannot build the environment, or None when it can."""
    if info.implementation != "cpython":
        return f"{info.label} is {info.implementation}, PyTorch needs CPython"
    if info.bits != 64:
        return f"{info.label} is a {info.bits}-bit build; PyTorch needs 64-bit"
    if info.version[:2] < OLDEST:
        return f"{info.label} is too old (3.10 or newer is needed)"
    if info.version[:2] > NEWEST:
        return f"{info.label} is newer than PyTorch supports ({NEWEST[0]}.{NEWEST[1]} at most)"
    if not info.has_venv or not info.has_ensurepip:
        missing = "venv" if not info.has_venv else "ensurepip"
        fix = f" (install python{info.short}-venv)" if system == "Linux" else ""
        return f"{info.label} lacks its {missing} module{fix}"
    return None


def choose(found: Iterable[PythonInfo], system: str = "") -> PythonInfo | None:
    """The most wanted usable Python (by :data:`PREFERRED`), or None."""
    usable = [info for info in found if problem(info, system) is None]
    rank = {v: i for i, v in enumerate(PREFERRED)}
    usable.sort(key=lambda info: (rank.get(info.version[:2], len(rank)), -info.version[2]))
    return usable[0] if usable else None


def install_advice(system: str, rejected: Iterable[str] = ()) -> str:
    """What to install when no Python fits: named exactly, per platform, with why the others did not."""
    if system == "Windows":
        text = (
            f"Install Python {RECOMMENDED} (64-bit) from https://www.python.org/downloads/windows/ (the "
            "Microsoft Store Python does not work for this), then click Check again."
        )
    elif system == "Darwin":
        text = (
            f"Install Python {RECOMMENDED} from https://www.python.org/downloads/macos/ (or `brew install "
            f"python@{RECOMMENDED}`), then click Check again."
        )
    else:
        text = (
            "Install Python 3.10 or newer with its venv module, e.g. `sudo apt install python3 python3-venv` "
            "(Debian, Ubuntu) or `sudo dnf install python3` (Fedora), then click Check again."
        )
    reasons = [r for r in rejected if r]
    if reasons:
        text += " Found, but not usable: " + "; ".join(reasons) + "."
    return text
