"""The environment the setup's steps and the local service start with.

Krita runs its own embedded Python: a ``PYTHONHOME`` or ``PYTHONPATH`` it (or the person) set would
make the backend's Python load Krita's standard library; an AppImage puts its own libraries and
programs first on ``LD_LIBRARY_PATH`` and ``PATH``. None of that may reach another Python.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DROPPED = (
    "PYTHONHOME",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONEXECUTABLE",
    "PYTHONUSERBASE",
    "PYTHONSAFEPATH",
    "__PYVENV_LAUNCHER__",  # macOS: set by a framework Python for its children
    "VIRTUAL_ENV",
    "PIP_REQUIRE_VIRTUALENV",
    "PIP_USER",
    "PIP_TARGET",
    "PIP_PREFIX",
)


def clean_env(env: Mapping[str, str], system: str) -> dict[str, str]:
    """A copy of ``env`` for another Python: Krita's Python variables dropped, an AppImage's own
    folders taken out of the search paths, output unbuffered and UTF-8 (it is read line by line)."""
    out = {k: v for k, v in env.items() if k not in DROPPED}
    appdir = env.get("APPDIR", "") if system == "Linux" else ""
    if appdir:
        for name in ("PATH", "LD_LIBRARY_PATH"):
            if name in out:
                kept = [p for p in out[name].split(os.pathsep) if p and not p.startswith(appdir)]
                if kept:
                    out[name] = os.pathsep.join(kept)
                elif name == "PATH":
                    out[name] = DEFAULT_PATH
                else:
                    del out[name]
    out["PYTHONUNBUFFERED"] = "1"
    out["PYTHONIOENCODING"] = "utf-8"
    out["PYTHONNOUSERSITE"] = "1"
    return out
