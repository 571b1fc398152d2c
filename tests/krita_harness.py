"""Run real Krita 5 under Xvfb with a scenario, for tests. Not a test module itself.

:func:`run_krita` gives Krita a private HOME (``HOME``, ``XDG_*``, ``TMPDIR`` under a work folder),
installs plugin zips the way "Import Python Plugin from File" does (Krita's own importer code when
it is installed, ``/usr/share/krita/pykrita/plugin_importer``), enables them and a driver plugin
(``tests/krita_driver/driver.py``, installed as ``krita_sdxl_e2e_driver``) in ``kritarc``, starts
Xvfb on a free display and ``krita --nosplash``, and enforces a hard timeout (then screenshots the
screen and kills Krita and Xvfb). The driver runs the scenario module on ``windowCreated``, writes
a JSON result and quits Krita.

A cold start with an empty HOME spends 10+ s building Krita's resource cache; the harness keeps that
cache (``$XDG_DATA_HOME/krita`` without plugins) from the first good run of the session and copies
it into later runs, which then start in 3 to 5 s.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DRIVER_SOURCE = TESTS / "krita_driver" / "driver.py"
SCENARIOS = TESTS / "krita_driver"
ARTIFACTS = TESTS / "artifacts"
DRIVER_NAME = "krita_sdxl_e2e_driver"
KRITA_IMPORTER = Path("/usr/share/krita/pykrita/plugin_importer/plugin_importer.py")
CONFIG_ENV = "KRITA_SDXL_E2E_CONFIG"

_DESKTOP = """[Desktop Entry]
Type=Service
ServiceTypes=Krita/PythonPlugin
X-KDE-Library={name}
X-Python-2-Compatible=false
Name={title}
Comment={title}
"""


def load_build_plugin() -> types.ModuleType:
    """``packaging/build_plugin.py`` as a module (packaging/ is not a package)."""
    module = sys.modules.get("build_plugin")
    if module is None:
        spec = importlib.util.spec_from_file_location("build_plugin", ROOT / "packaging" / "build_plugin.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["build_plugin"] = module
        spec.loader.exec_module(module)
    return module


def require_krita() -> None:
    """Skip the calling test where real Krita cannot run; fail instead on CI (``$CI`` set)."""
    import pytest

    missing = missing_tools()
    if missing:
        message = f"cannot run real Krita here, missing: {', '.join(missing)} (apt-get install krita xvfb imagemagick)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def krita_binary() -> str | None:
    return os.environ.get("KRITA_BIN") or shutil.which("krita")


def missing_tools() -> list[str]:
    """What running Krita here lacks (empty when it can run)."""
    tools = {"krita": krita_binary(), "Xvfb": shutil.which("Xvfb"), "import (imagemagick)": shutil.which("import")}
    return [name for name, path in tools.items() if not path]


# ----------------------------------------------------------------------------- kritarc


def _escape(value: str) -> str:
    out = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if out[:1] == " ":
        out = "\\s" + out[1:]
    if out[-1:] == " ":
        out = out[:-1] + "\\s"
    return out


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return _escape(str(value))


def update_kritarc(path: Path, groups: Mapping[str, Mapping[str, object]]) -> None:
    """Set ``key=value`` in ``[group]`` of a KConfig file, keeping everything else as it is."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    for group, values in groups.items():
        header = f"[{group}]"
        try:
            start = lines.index(header)
        except ValueError:
            if lines and lines[-1].strip():
                lines.append("")
            lines.append(header)
            start = len(lines) - 1
        end = start + 1
        while end < len(lines) and not lines[end].startswith("["):
            end += 1
        for key, value in values.items():
            line = f"{key}={_format(value)}"
            for i in range(start + 1, end):
                if lines[i].split("=", 1)[0] == key:
                    lines[i] = line
                    break
            else:
                insert = end
                while insert > start + 1 and not lines[insert - 1].strip():
                    insert -= 1
                lines.insert(insert, line)
                end += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- plugins


def _krita_importer() -> Any | None:
    """Krita's own ``plugin_importer`` module, loaded from its file; None when not installed."""
    path = Path(os.environ.get("KRITA_PLUGIN_IMPORTER", KRITA_IMPORTER))
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("krita_plugin_importer", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    module.i18n = lambda text: text  # type: ignore[attr-defined]  # Krita injects i18n as a builtin
    spec.loader.exec_module(module)
    return module


def install_plugin_zip(zip_path: Path, resources_dir: Path) -> list[str]:
    """Install a plugin zip into ``resources_dir`` (``$XDG_DATA_HOME/krita``) as Krita's importer
    does; returns the installed module names. Raises if the zip holds no plugin Krita would import."""
    resources_dir.mkdir(parents=True, exist_ok=True)
    importer = _krita_importer()
    if importer is not None:
        plugins = importer.PluginImporter(str(zip_path), str(resources_dir), lambda plugin: True).import_all()
        return [plugin["name"] for plugin in plugins]
    # Fallback (no Krita installed here): the same rules, simplified: a top-level *.desktop naming
    # X-KDE-Library=<name>, and a <name>/ directory entry with <name>/__init__.py in the zip.
    names = []
    with zipfile.ZipFile(zip_path) as zf:
        namelist = zf.namelist()
        for desktop in (n for n in namelist if n.endswith(".desktop")):
            text = zf.read(desktop).decode("utf-8")
            name = next(line.split("=", 1)[1].strip() for line in text.splitlines() if line.startswith("X-KDE-Library"))
            if f"{name}/" not in namelist or f"{name}/__init__.py" not in namelist:
                continue
            pykrita = resources_dir / "pykrita"
            pykrita.mkdir(exist_ok=True)
            (pykrita / f"{name}.desktop").write_bytes(zf.read(desktop))
            shutil.rmtree(pykrita / name, ignore_errors=True)
            for member in (n for n in namelist if n.startswith(f"{name}/")):
                zf.extract(member, pykrita)
            names.append(name)
    if not names:
        raise RuntimeError(f"{zip_path}: no plugin found")
    return names


def install_driver(pykrita: Path) -> None:
    package = pykrita / DRIVER_NAME
    package.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DRIVER_SOURCE, package / "__init__.py")
    (pykrita / f"{DRIVER_NAME}.desktop").write_text(
        _DESKTOP.format(name=DRIVER_NAME, title="krita-sdxl E2E test driver"), encoding="utf-8"
    )


# ----------------------------------------------------------------------------- warmed HOME

_TEMPLATE: dict[str, Path] = {}


def _template_dir() -> Path | None:
    path = _TEMPLATE.get("resources")
    return path if path is not None and path.is_dir() else None


def _harvest_template(resources_dir: Path) -> None:
    """Keep Krita's resource folder (its cache database and bundles), without plugins."""
    if _template_dir() is not None or not (resources_dir / "resourcecache.sqlite").is_file():
        return
    base = Path(tempfile.mkdtemp(prefix="krita-harness-template-"))
    atexit.register(shutil.rmtree, base, True)
    target = base / "krita"
    shutil.copytree(resources_dir, target, symlinks=True, ignore=shutil.ignore_patterns("pykrita", "actions"))
    _TEMPLATE["resources"] = target


# ----------------------------------------------------------------------------- the run


@dataclass
class KritaRun:
    name: str
    workdir: Path
    log_path: Path
    duration_s: float
    returncode: int | None
    timed_out: bool = False
    hung_on_quit: bool = False
    warm: bool = False
    result: dict[str, Any] | None = None
    screenshots: list[Path] = field(default_factory=list)

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    def describe(self) -> str:
        r = self.result or {}
        parts = [
            f"Krita run {self.name!r}: {self.duration_s:.1f} s, returncode {self.returncode}, "
            f"timed_out={self.timed_out}, hung_on_quit={self.hung_on_quit}, warm HOME={self.warm}, "
            f"workdir {self.workdir}",
        ]
        if self.result is None:
            parts.append("no result file: the driver never finished (see the log below)")
        else:
            parts.append(f"ok={r.get('ok')} error={r.get('error')}")
            if r.get("traceback"):
                parts.append(r["traceback"])
            for text in r.get("uncaught") or []:
                parts.append("uncaught exception inside Krita:\n" + text)
            if r.get("log"):
                parts.append("scenario log:\n  " + "\n  ".join(r["log"]))
        if self.screenshots:
            parts.append("screenshots: " + ", ".join(map(str, self.screenshots)))
        parts.append(f"--- Krita stderr/stdout (last 60 lines of {self.log_path}) ---\n{self.tail()}")
        return "\n".join(parts)

    def check(self) -> dict[str, Any]:
        """The scenario's return value; AssertionError with the whole story when the run failed."""
        if self.result is None or not self.result.get("ok") or self.timed_out:
            raise AssertionError(self.describe())
        return self.result["value"]


def _start_xvfb(screen: str, log: Any) -> tuple[subprocess.Popen, str]:
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", screen, "-nolisten", "tcp", "-noreset"],
            pass_fds=(write_fd,),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    try:
        buf = b""
        deadline = time.monotonic() + 20
        while not buf.endswith(b"\n"):
            ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(read_fd, 64) if ready else b""
            if not chunk:
                _stop(proc, 0)
                raise RuntimeError(f"Xvfb did not report a display (exit code {proc.returncode})")
            buf += chunk
    finally:
        os.close(read_fd)
    return proc, f":{int(buf.strip())}"


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL, the process group we started."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _screenshot(display: str, path: Path, env: Mapping[str, str]) -> Path | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["import", "-display", display, "-window", "root", str(path)],
            check=True,
            timeout=20,
            capture_output=True,
            env=dict(env),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return path


def run_krita(
    scenario: str | Path,
    workdir: Path,
    *,
    name: str = "krita",
    params: Mapping[str, Any] | None = None,
    plugin_zips: Iterable[Path] = (),
    settings: Mapping[str, Mapping[str, object]] | None = None,
    timeout_s: float = 120.0,
    scenario_timeout_s: float | None = None,
    quit_grace_s: float = 20.0,
    artifacts: Path | None = ARTIFACTS,
    warm: bool = True,
    extra_env: Mapping[str, str] | None = None,
    screen: str = "1600x1000x24",
) -> KritaRun:
    """Run Krita once with ``scenario`` (a file path, or a name in ``tests/krita_driver/``).

    ``plugin_zips`` are installed and enabled; ``settings`` are ``{group: {key: value}}`` written to
    kritarc (what ``Krita.instance().readSetting(group, key, default)`` reads). The driver's own
    watchdog stops the scenario after ``scenario_timeout_s`` (default: ``timeout_s`` - 15 s); the
    harness kills everything after ``timeout_s``. Never raises for a failed run: call
    :meth:`KritaRun.check`.
    """
    krita = krita_binary()
    if krita is None:
        raise RuntimeError("krita is not installed (apt-get install krita)")
    scenario_path = Path(scenario)
    if not scenario_path.is_absolute() and not scenario_path.exists():
        scenario_path = SCENARIOS / (scenario_path.name if scenario_path.suffix else f"{scenario_path.name}.py")
    scenario_path = scenario_path.resolve()
    if not scenario_path.is_file():
        raise FileNotFoundError(scenario_path)

    workdir = Path(workdir).resolve()
    home = workdir / "home"
    config_home, data_home, cache_home = home / ".config", home / ".local" / "share", home / ".cache"
    runtime, tmp = workdir / "runtime", workdir / "tmp"
    for folder in (config_home, data_home, cache_home, runtime, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    resources = data_home / "krita"
    template = _template_dir() if warm else None
    if template is not None and not resources.exists():
        shutil.copytree(template, resources, symlinks=True)

    enabled = [DRIVER_NAME]
    for zip_path in plugin_zips:
        enabled += install_plugin_zip(Path(zip_path), resources)
    install_driver(resources / "pykrita")
    groups: dict[str, dict[str, object]] = {"python": {f"enable_{n}": True for n in enabled}}
    for group, values in (settings or {}).items():
        groups.setdefault(group, {}).update(values)
    update_kritarc(config_home / "kritarc", groups)

    result_path = workdir / "result.json"
    result_path.unlink(missing_ok=True)
    config = {
        "scenario": str(scenario_path),
        "result": str(result_path),
        "params": dict(params or {}),
        "artifacts": str(artifacts) if artifacts is not None else None,
        "name": name,
        "timeout_s": scenario_timeout_s if scenario_timeout_s is not None else max(timeout_s - 15.0, 5.0),
    }
    config_path = workdir / "e2e_config.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(config_home),
        "XDG_DATA_HOME": str(data_home),
        "XDG_CACHE_HOME": str(cache_home),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "XDG_RUNTIME_DIR": str(runtime),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "DBUS_SESSION_BUS_ADDRESS": "disabled:",
        "QT_QPA_PLATFORM": "xcb",
        "PYTHONFAULTHANDLER": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        CONFIG_ENV: str(config_path),
        **(extra_env or {}),
    }

    log_path = workdir / "krita.log"
    started = time.monotonic()
    run = KritaRun(name, workdir, log_path, 0.0, None, warm=template is not None)
    with log_path.open("wb") as log:
        xvfb, display = _start_xvfb(screen, log)
        env["DISPLAY"] = display
        proc = None
        try:
            log.write(f"[harness] Xvfb on {display}; krita {krita}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [krita, "--nosplash"],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            deadline = started + timeout_s
            quit_deadline = None
            while proc.poll() is None:
                now = time.monotonic()
                if quit_deadline is None and result_path.exists():
                    quit_deadline = now + quit_grace_s
                if now > deadline or (quit_deadline is not None and now > quit_deadline):
                    run.timed_out = quit_deadline is None
                    run.hung_on_quit = quit_deadline is not None
                    label = "timeout" if run.timed_out else "hung-on-quit"
                    if artifacts is not None:
                        shot = _screenshot(display, artifacts / f"{name}-{label}.png", env)
                        if shot is not None:
                            run.screenshots.append(shot)
                    log.write(f"[harness] {label}: killing Krita after {now - started:.1f} s\n".encode())
                    log.flush()
                    break
                time.sleep(0.1)
        finally:
            if proc is not None:
                _stop(proc, 5.0)
            _stop(xvfb, 5.0)
    run.returncode = proc.returncode if proc is not None else None
    run.duration_s = time.monotonic() - started
    if result_path.exists():
        with contextlib.suppress(json.JSONDecodeError):
            run.result = json.loads(result_path.read_text(encoding="utf-8"))
    if run.result is not None:
        run.screenshots += [Path(p) for p in run.result.get("files", []) if p.endswith(".png")]
    if run.result and run.result.get("ok") and not run.timed_out and not run.hung_on_quit and run.returncode == 0:
        _harvest_template(resources)
    return run
