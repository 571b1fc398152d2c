#!/usr/bin/env python3
"""Build the Krita plugin zip that "Tools > Scripts > Import Python Plugin from File..." accepts.

Layout of the zip (Krita 5's importer, ``pykrita/plugin_importer/plugin_importer.py``, looks for
``*.desktop`` files, reads ``X-KDE-Library`` from them, and needs a *directory entry* named after
that library with an ``__init__.py`` inside; it copies the desktop file and that folder into
``pykrita/``, and an optional ``<library>.action`` file into ``actions/``)::

    krita_sdxl_refiner.desktop
    krita_sdxl_refiner.action                      (only if krita_plugin/ has one)
    krita_sdxl_refiner/__init__.py ...             the plugin, without __pycache__
    krita_sdxl_refiner/_vendor/common/krita_sdxl/__init__.py
    krita_sdxl_refiner/_vendor/common/krita_sdxl/protocol/...     copy of protocol/
    krita_sdxl_refiner/_vendor/common/krita_sdxl/backend/__init__.py, setup/__init__.py, setup/plan/...
                                                   the setup's pure decisions (stdlib only), shared with the backend
    krita_sdxl_refiner/_wheels/krita_sdxl-VERSION-py3-none-any.whl
                                                   the backend the docker's Set up installs (same version)
    krita_sdxl_refiner/_vendor/cp311-manylinux_x86_64/zmq/...     pyzmq + msgpack wheels, unpacked
    krita_sdxl_refiner/_vendor/cp310-win_amd64/...
    ...

``krita_sdxl_refiner/vendor.py`` picks the ``_vendor/<tag>`` folder at run time.

The backend wheel is built from this checkout (``pip wheel``, reproducible with SOURCE_DATE_EPOCH) and
also written beside the zip, for ``pip install`` on a headless machine; its version must be the one in
``backend/setup/plan/version.py``, which the plugin compares with the service's.

Wheels are pinned (:data:`PACKAGES`), fetched with ``pip download`` into a cache folder (default
``build/wheels``) and checked against ``packaging/vendor-wheels.sha256``; a re-run with a filled
cache never calls pip. The zip is deterministic: sorted entries, fixed timestamps and permissions.

    python packaging/build_plugin.py                      # every platform, dist/krita_sdxl_refiner.zip
    python packaging/build_plugin.py --no-vendor          # no wheels: Krita must have pyzmq/msgpack
    python packaging/build_plugin.py --platforms 'cp311-*' cp310-win_amd64
    python packaging/build_plugin.py --no-backend-wheel   # Set up then needs KRITA_SDXL_BACKEND_WHEEL
"""

from __future__ import annotations

import argparse
import ast
import configparser
import fnmatch
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_NAME = "krita_sdxl_refiner"
DEFAULT_PLUGIN_DIR = ROOT / "krita_plugin"
DEFAULT_PROTOCOL_DIR = ROOT / "protocol"
DEFAULT_SOURCE_DIR = ROOT  # pyproject.toml, README.md, backend/, protocol/: the backend wheel's sources
WHEELS_DIR = "_wheels"  # in the plugin: the backend wheel
SHARED_BACKEND = ("__init__.py", "setup/__init__.py", "setup/plan")  # of backend/: what the plugin runs (stdlib only)
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the zip format's first day: a reproducible wheel
DEFAULT_OUTPUT = ROOT / "dist" / f"{PLUGIN_NAME}.zip"
DEFAULT_CACHE = ROOT / "build" / "wheels"
DEFAULT_LOCK = ROOT / "packaging" / "vendor-wheels.sha256"

# Pinned third-party packages the plugin needs; pure stdlib otherwise.
PACKAGES = {"pyzmq": "27.3.0", "msgpack": "1.2.4"}
PYTHONS = ("3.10", "3.11", "3.12")


def _mac(arch: str, versions: Sequence[str], universal2_versions: Sequence[str]) -> tuple[str, ...]:
    """macOS platform tags, newest version first: the thin-arch ones, then the universal2 ones."""
    return tuple(
        [f"macosx_{v.replace('.', '_')}_{arch}" for v in versions]
        + [f"macosx_{v.replace('.', '_')}_universal2" for v in universal2_versions]
    )


_MAC_10 = [f"10.{minor}" for minor in range(15, 8, -1)]

# Folder suffix -> the pip --platform values a wheel may carry, most preferred first. macOS:
# x86_64 wheels for 10.15 or older (pyzmq 27's floor); arm64 wheels for 11.0 (the first arm64
# macOS), or universal2 wheels for 10.x, whose arm64 half runs there. Linux: manylinux wheels that
# need glibc 2.28 or older (pyzmq 27 needs 2.26).
PLATFORMS: dict[str, tuple[str, ...]] = {
    "win_amd64": ("win_amd64",),
    "macosx_x86_64": _mac("x86_64", _MAC_10, _MAC_10),
    "macosx_arm64": _mac("arm64", ["11.0"], ["11.0", *_MAC_10]),
    "manylinux_x86_64": (
        *(f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)),
        "manylinux2014_x86_64",
    ),
}

EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
SKIP_DIRS = {"__pycache__", "_vendor"}
SKIP_SUFFIXES = (".pyc", ".pyo")


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Target:
    """One interpreter the zip carries wheels for: ``cp311-manylinux_x86_64``."""

    python: str  # "3.11"
    platform: str  # a key of PLATFORMS

    @property
    def tag(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.platform}"

    @property
    def pip_platforms(self) -> tuple[str, ...]:
        return PLATFORMS[self.platform]


ALL_TARGETS = tuple(Target(py, plat) for py in PYTHONS for plat in PLATFORMS)


def select_targets(patterns: Sequence[str] | None) -> list[Target]:
    """Targets whose tag matches any of the (fnmatch) patterns; all of them for ``None``."""
    if not patterns:
        return list(ALL_TARGETS)
    chosen = [t for t in ALL_TARGETS if any(fnmatch.fnmatchcase(t.tag, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(t.tag, p) for t in ALL_TARGETS)]
    if unmatched:
        known = ", ".join(t.tag for t in ALL_TARGETS)
        raise BuildError(f"no platform matches {', '.join(unmatched)}; known: {known}")
    return chosen


# ----------------------------------------------------------------------------- wheels


@dataclass(frozen=True)
class WheelName:
    path: Path
    project: str
    version: str
    pythons: frozenset[str]
    abis: frozenset[str]
    platforms: frozenset[str]

    @classmethod
    def parse(cls, path: Path) -> WheelName | None:
        parts = path.name[: -len(".whl")].split("-") if path.name.endswith(".whl") else []
        if len(parts) not in (5, 6):
            return None
        project, version, *_build, pys, abis, plats = parts
        return cls(
            path,
            re.sub(r"[-_.]+", "-", project).lower(),
            version,
            frozenset(pys.split(".")),
            frozenset(abis.split(".")),
            frozenset(plats.split(".")),
        )

    def rank(self, target: Target) -> tuple[int, int] | None:
        """Lower is better; ``None`` when the wheel does not install on ``target``."""
        cp = f"cp{target.python.replace('.', '')}"
        minor = int(target.python.split(".")[1])
        if cp in self.pythons and cp in self.abis:
            interp = 0
        elif "abi3" in self.abis and any(
            p.startswith("cp3") and p[3:].isdigit() and int(p[3:]) <= minor for p in self.pythons
        ):
            interp = 1
        elif "none" in self.abis and self.pythons & {"py3", f"py3{minor}", cp}:
            interp = 2
        else:
            return None
        if "any" in self.platforms:
            return interp, len(target.pip_platforms)
        ranks = [i for i, plat in enumerate(target.pip_platforms) if plat in self.platforms]
        return (interp, min(ranks)) if ranks else None


def find_cached_wheel(cache: Path, project: str, version: str, target: Target) -> Path | None:
    best: tuple[tuple[int, int], str, Path] | None = None
    for path in cache.glob("*.whl") if cache.is_dir() else ():
        wheel = WheelName.parse(path)
        if wheel is None or wheel.project != project or wheel.version != version:
            continue
        rank = wheel.rank(target)
        if rank is not None and (best is None or (rank, path.name) < best[:2]):
            best = (rank, path.name, path)
    return None if best is None else best[2]


def pip_download(requirements: Sequence[str], target: Target, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    cmd += ["--only-binary=:all:", "--no-deps", "--implementation", "cp", "--python-version", target.python]
    for plat in target.pip_platforms:
        cmd += ["--platform", plat]
    cmd += ["--dest", str(dest), *requirements]
    print(f"  pip download {' '.join(requirements)} for {target.tag}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"pip download failed for {target.tag} ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_lock(path: Path) -> dict[str, str]:
    lock: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                digest, name = line.split(maxsplit=1)
                lock[name.strip()] = digest
    return lock


def write_lock(path: Path, lock: dict[str, str]) -> None:
    lines = ["# sha256 of the wheels packaging/build_plugin.py vendors (sha256sum format)"]
    lines += [f"{digest}  {name}" for name, digest in sorted(lock.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def resolve_wheels(
    targets: Iterable[Target], cache: Path, lock: dict[str, str], *, offline: bool, update_lock: bool
) -> dict[Target, list[Path]]:
    """Find or download every pinned wheel for every target; verify them against ``lock``."""
    cache.mkdir(parents=True, exist_ok=True)
    chosen: dict[Target, list[Path]] = {}
    for target in targets:
        missing = [p for p, v in PACKAGES.items() if find_cached_wheel(cache, p, v, target) is None]
        if missing:
            if offline:
                raise BuildError(f"--offline: no cached wheel for {', '.join(missing)} on {target.tag} in {cache}")
            pip_download([f"{p}=={PACKAGES[p]}" for p in missing], target, cache)
        wheels = []
        for project, version in PACKAGES.items():
            path = find_cached_wheel(cache, project, version, target)
            if path is None:
                raise BuildError(f"pip found no {project}=={version} wheel usable on {target.tag} in {cache}")
            digest = sha256(path)
            if update_lock:
                lock[path.name] = digest
            elif path.name not in lock:
                raise BuildError(f"{path.name} is not in the wheel lock; rerun with --update-lock to accept it")
            elif lock[path.name] != digest:
                raise BuildError(f"{path} has sha256 {digest}, the lock says {lock[path.name]}")
            wheels.append(path)
        chosen[target] = wheels
    return chosen


def wheel_files(path: Path) -> Iterator[tuple[str, bytes, bool]]:
    """(relative path, content, executable) of what installing the wheel into site-packages writes."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: not importable code
                parts = parts[2:]
            if "__pycache__" in parts or name.endswith(SKIP_SUFFIXES):
                continue
            yield "/".join(parts), zf.read(info), bool((info.external_attr >> 16) & 0o111)


# ----------------------------------------------------------------------------- the backend wheel


def source_version(source_dir: Path) -> str:
    """``VERSION`` from backend/setup/plan/version.py (read, not imported)."""
    path = source_dir / "backend" / "setup" / "plan" / "version.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError) as exc:
        raise BuildError(f"cannot read the version from {path}: {exc}") from exc
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "VERSION" for t in node.targets):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return node.value.value
    raise BuildError(f'{path} has no VERSION = "..."')


def build_backend_wheel(source_dir: Path, dest: Path) -> Path:
    """``pip wheel`` the backend from a clean copy of its sources (no stale build/ folder, no caches)."""
    version = source_version(source_dir)
    with tempfile.TemporaryDirectory(prefix="krita-sdxl-wheel-") as tmp:
        src = Path(tmp) / "src"
        for name in ("pyproject.toml", "README.md"):
            if not (source_dir / name).is_file():
                raise BuildError(f"no {name} in {source_dir}: not a krita-sdxl checkout")
            src.mkdir(exist_ok=True)
            shutil.copyfile(source_dir / name, src / name)
        for package in ("backend", "protocol"):
            for rel, path in source_files(source_dir / package):
                target = src / package / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check"]
        if importlib.util.find_spec("setuptools") is not None:
            cmd.append("--no-build-isolation")  # seconds instead of fetching setuptools again
        cmd += ["--wheel-dir", str(out), str(src)]
        print("  pip wheel the backend", flush=True)
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
        )
        wheels = sorted(out.glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise BuildError(f"pip wheel failed for the backend ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        parsed = WheelName.parse(wheels[0])
        if parsed is None or parsed.project != "krita-sdxl" or parsed.version != version:
            raise BuildError(f"the backend wheel {wheels[0].name} is not krita-sdxl {version}")
        dest.mkdir(parents=True, exist_ok=True)
        final = dest / wheels[0].name
        shutil.copyfile(wheels[0], final)
        return final


# ----------------------------------------------------------------------------- sources


def source_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, file) under ``folder``, without caches, hidden files or ``_vendor``."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(SKIP_SUFFIXES):
                continue
            path = Path(dirpath) / name
            yield path.relative_to(folder).as_posix(), path


def check_desktop(path: Path) -> None:
    config = configparser.ConfigParser(interpolation=None)
    try:
        config.read_string(path.read_text(encoding="utf-8"))
        entry = config["Desktop Entry"]
        library, service, name = entry["X-KDE-Library"], entry["ServiceTypes"], entry["Name"]
    except (configparser.Error, KeyError, UnicodeDecodeError) as exc:
        raise BuildError(f"{path}: not a Krita plugin desktop file ({exc!r})") from exc
    if library.strip() != PLUGIN_NAME or "Krita/PythonPlugin" not in service or not name.strip():
        raise BuildError(
            f"{path}: needs X-KDE-Library={PLUGIN_NAME}, ServiceTypes=Krita/PythonPlugin and a Name "
            f"(has X-KDE-Library={library!r}, ServiceTypes={service!r})"
        )


@dataclass
class Entry:
    data: bytes
    executable: bool = False


def collect(
    plugin_dir: Path,
    protocol_dir: Path,
    wheels: dict[Target, list[Path]] | None,
    source_dir: Path = DEFAULT_SOURCE_DIR,
    backend_wheel: Path | None = None,
) -> dict[str, Entry]:
    package = plugin_dir / PLUGIN_NAME
    desktop = plugin_dir / f"{PLUGIN_NAME}.desktop"
    if not (package / "__init__.py").is_file():
        raise BuildError(f"no plugin package: {package / '__init__.py'} is missing")
    if not desktop.is_file():
        raise BuildError(f"no desktop file: {desktop} is missing")
    check_desktop(desktop)
    if not (protocol_dir / "__init__.py").is_file():
        raise BuildError(f"no protocol package: {protocol_dir / '__init__.py'} is missing")

    entries: dict[str, Entry] = {desktop.name: Entry(desktop.read_bytes())}
    action = plugin_dir / f"{PLUGIN_NAME}.action"
    if action.is_file():
        entries[action.name] = Entry(action.read_bytes())
    for rel, path in source_files(package):
        entries[f"{PLUGIN_NAME}/{rel}"] = Entry(path.read_bytes())

    common = f"{PLUGIN_NAME}/_vendor/common/krita_sdxl"
    # A regular package (not a namespace): on sys.path first, it cannot merge with another krita_sdxl.
    entries[f"{common}/__init__.py"] = Entry(b'"""krita-sdxl code bundled with the Krita plugin."""\n')
    for rel, path in source_files(protocol_dir):
        entries[f"{common}/protocol/{rel}"] = Entry(path.read_bytes())
    backend = source_dir / "backend"
    for name in SHARED_BACKEND:
        path = backend / name
        if path.is_file():
            entries[f"{common}/backend/{name}"] = Entry(path.read_bytes())
        elif path.is_dir():
            for rel, file in source_files(path):
                entries[f"{common}/backend/{name}/{rel}"] = Entry(file.read_bytes())
        else:
            raise BuildError(f"no {path}: the plugin needs the setup's shared code")
    if backend_wheel is not None:
        entries[f"{PLUGIN_NAME}/{WHEELS_DIR}/{backend_wheel.name}"] = Entry(backend_wheel.read_bytes())

    for target, paths in (wheels or {}).items():
        prefix = f"{PLUGIN_NAME}/_vendor/{target.tag}"
        for wheel in paths:
            for rel, data, executable in wheel_files(wheel):
                name = f"{prefix}/{rel}"
                if name in entries and entries[name].data != data:
                    raise BuildError(f"{wheel.name} overwrites {name} with different content")
                entries[name] = Entry(data, executable)
    return entries


def write_zip(entries: dict[str, Entry], output: Path) -> int:
    """Write ``entries`` plus a directory entry for every folder, deterministically. Returns the count."""
    names = set(entries)
    for name in entries:
        parts = name.split("/")[:-1]
        names.update("/".join(parts[: i + 1]) + "/" for i in range(len(parts)))
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as zf:
            for name in sorted(names):
                info = zipfile.ZipInfo(name, date_time=EPOCH)
                info.create_system = 3  # unix, so external_attr holds the permission bits everywhere
                if name.endswith("/"):
                    info.external_attr = (0o40755 << 16) | 0x10
                    zf.writestr(info, b"")
                else:
                    entry = entries[name]
                    info.external_attr = (0o100755 if entry.executable else 0o100644) << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, entry.data, compresslevel=9)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(names)


def build(
    output: Path = DEFAULT_OUTPUT,
    *,
    plugin_dir: Path = DEFAULT_PLUGIN_DIR,
    protocol_dir: Path = DEFAULT_PROTOCOL_DIR,
    vendor: bool = True,
    platforms: Sequence[str] | None = None,
    wheels_cache: Path = DEFAULT_CACHE,
    lock_file: Path = DEFAULT_LOCK,
    offline: bool = False,
    update_lock: bool = False,
    source_dir: Path = DEFAULT_SOURCE_DIR,
    backend_wheel: bool = True,
) -> Path:
    """Build the plugin zip at ``output`` (and, with ``backend_wheel``, the backend wheel beside it)."""
    wheels = None
    if vendor:
        lock = read_lock(lock_file)
        targets = select_targets(platforms)
        wheels = resolve_wheels(targets, wheels_cache, lock, offline=offline, update_lock=update_lock)
        if update_lock:
            write_lock(lock_file, lock)
    wheel = build_backend_wheel(source_dir, output.parent) if backend_wheel else None
    entries = collect(plugin_dir, protocol_dir, wheels, source_dir, wheel)
    count = write_zip(entries, output)
    size = output.stat().st_size
    vendored = ", ".join(t.tag for t in wheels) if wheels else "none"
    print(f"wrote {output}: {size / 1e6:.2f} MB ({size} bytes), {count} entries; vendored: {vendored}")
    if wheel is not None:
        print(f"wrote {wheel} (also inside the zip, for the docker's Set up)")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="zip to write (%(default)s)")
    parser.add_argument("--wheels-cache", type=Path, default=DEFAULT_CACHE, help="wheel download cache (%(default)s)")
    parser.add_argument(
        "--platforms",
        nargs="+",
        metavar="TAG",
        help="interpreters to vendor, as tags or fnmatch patterns (default: all of "
        + ", ".join(t.tag for t in ALL_TARGETS)
        + ")",
    )
    parser.add_argument("--no-vendor", action="store_true", help="no pyzmq/msgpack wheels: Krita's Python has them")
    parser.add_argument("--offline", action="store_true", help="never run pip; every wheel must be in the cache")
    parser.add_argument(
        "--no-backend-wheel", action="store_true", help="leave the backend wheel out (Set up then needs one named)"
    )
    parser.add_argument("--update-lock", action="store_true", help=f"record the wheels' sha256 in {DEFAULT_LOCK.name}")
    parser.add_argument("--lock", type=Path, default=DEFAULT_LOCK, help=argparse.SUPPRESS)
    parser.add_argument("--plugin-dir", type=Path, default=DEFAULT_PLUGIN_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--protocol-dir", type=Path, default=DEFAULT_PROTOCOL_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        build(
            args.output,
            plugin_dir=args.plugin_dir,
            protocol_dir=args.protocol_dir,
            vendor=not args.no_vendor,
            platforms=args.platforms,
            wheels_cache=args.wheels_cache,
            lock_file=args.lock,
            offline=args.offline,
            update_lock=args.update_lock,
            backend_wheel=not args.no_backend_wheel,
        )
    except BuildError as exc:
        print(f"build_plugin: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
