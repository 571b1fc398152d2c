"""Put the plugin's bundled third-party code on ``sys.path``.

The packaged plugin (``packaging/build_plugin.py``) carries:

* ``_vendor/common/``: pure-Python code shared by every platform (``krita_sdxl/protocol``);
* ``_vendor/<tag>/``: pyzmq and msgpack unpacked from the wheels for one interpreter, where
  ``<tag>`` is ``cp<major><minor>-<platform>``, e.g. ``cp310-win_amd64``, ``cp311-manylinux_x86_64``,
  ``cp312-macosx_arm64`` or ``cp311-macosx_x86_64``.

:func:`activate` must run before anything imports ``zmq``, ``msgpack`` or ``krita_sdxl``. Run from
a source checkout, or inside a Krita whose Python already has pyzmq and msgpack (Debian's krita with
python3-zmq and python3-msgpack), no ``_vendor/<tag>`` folder is needed and none is required.

This module uses only the standard library and must stay importable on Python 3.10 without Krita.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from pathlib import Path

__all__ = ["REQUIRED_MODULES", "VENDOR_DIR", "VendorError", "activate", "available_tags", "interpreter_tag"]

VENDOR_DIR = Path(__file__).resolve().parent / "_vendor"
COMMON = "common"
REQUIRED_MODULES = ("zmq", "msgpack")

_OS_NAMES = {"win32": "win", "darwin": "macosx", "linux": "manylinux"}
_MACHINES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "arm64", "aarch64": "arm64"}


class VendorError(ImportError):
    """No bundled pyzmq/msgpack fits this Krita's Python, and it has none of its own."""


def interpreter_tag(
    version_info: tuple[int, ...] | None = None,
    sys_platform: str | None = None,
    machine: str | None = None,
    implementation: str | None = None,
    pointer_bits: int | None = None,
) -> str | None:
    """Return the ``_vendor`` folder name for an interpreter (default: the running one).

    ``None`` when the interpreter is not one the build could ship wheels for (PyPy, 32-bit, BSD...).
    """
    version_info = tuple(sys.version_info) if version_info is None else tuple(version_info)
    sys_platform = sys.platform if sys_platform is None else sys_platform
    machine = platform.machine() if machine is None else machine
    implementation = sys.implementation.name if implementation is None else implementation
    pointer_bits = (64 if sys.maxsize > 2**32 else 32) if pointer_bits is None else pointer_bits
    os_name = _OS_NAMES.get("linux" if sys_platform.startswith("linux") else sys_platform)
    arch = _MACHINES.get(machine.lower())
    if implementation != "cpython" or pointer_bits != 64 or os_name is None or arch is None:
        return None
    if os_name == "win":
        return f"cp{version_info[0]}{version_info[1]}-win_amd64" if arch == "x86_64" else None
    if os_name == "manylinux" and arch == "arm64":
        arch = "aarch64"  # the name Linux wheels use
    return f"cp{version_info[0]}{version_info[1]}-{os_name}_{arch}"


def available_tags(vendor_dir: Path | None = None) -> list[str]:
    """The interpreter folders the plugin was built with, sorted."""
    vendor_dir = VENDOR_DIR if vendor_dir is None else vendor_dir
    if not vendor_dir.is_dir():
        return []
    return sorted(p.name for p in vendor_dir.iterdir() if p.is_dir() and p.name != COMMON)


def _prepend(path: Path, index: int) -> int:
    entry = os.fspath(path)
    if entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(index, entry)
    return index + 1


def _missing_modules() -> dict[str, str]:
    missing = {}
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an ImportError, or a broken binary raising anything else
            missing[name] = f"{type(exc).__name__}: {exc}"
    return missing


def activate(vendor_dir: Path | None = None) -> None:
    """Put ``_vendor/common`` and then ``_vendor/<tag>`` for this interpreter first on ``sys.path``.

    Idempotent. Then imports ``zmq`` and ``msgpack`` to prove they load. Raises :class:`VendorError`
    when they do not: no bundled folder fits this interpreter (and it has no pyzmq/msgpack of its
    own), or the bundled binaries fail to load. The message names the platform, the machine and the
    Python version, and is meant to be shown to the user as is.
    """
    vendor_dir = VENDOR_DIR if vendor_dir is None else vendor_dir
    index = 0
    common = vendor_dir / COMMON
    if common.is_dir():
        index = _prepend(common, index)
    tag = interpreter_tag()
    bundled = tag is not None and (vendor_dir / tag).is_dir()
    if bundled:
        _prepend(vendor_dir / tag, index)
    importlib.invalidate_caches()
    missing = _missing_modules()
    if not missing:
        return
    where = (
        f"platform {sys.platform}, machine {platform.machine() or 'unknown'}, "
        f"Python {platform.python_version()} ({sys.implementation.name}, {64 if sys.maxsize > 2**32 else 32}-bit)"
    )
    reasons = "; ".join(f"{name}: {why}" for name, why in missing.items())
    if bundled:
        raise VendorError(
            f"The SDXL Refiner plugin's bundled pyzmq/msgpack ({tag}) failed to load on this Krita ({where}). {reasons}"
        )
    built = ", ".join(available_tags(vendor_dir)) or "none (this copy was packaged without them)"
    raise VendorError(
        f"The SDXL Refiner plugin has no bundled pyzmq/msgpack for this Krita ({where}); "
        f"looked for {tag or 'a folder (unsupported interpreter)'} in {vendor_dir}, bundled: {built}. "
        f"Import failed for {reasons}. "
        "Install the plugin zip built for your platform, or install pyzmq and msgpack into Krita's Python."
    )
