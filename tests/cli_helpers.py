"""Running the real ``krita-sdxl`` command as a person types it, and pictures to give it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

_SCRIPT = Path(sys.executable).parent / "krita-sdxl"
COMMAND = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "krita_sdxl.backend.cli"]


def krita_sdxl(*args: str, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    """``krita-sdxl ARGS``, waited for; stdout and stderr as text."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **kw.pop("env", {}))
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def spawn(*args: str, **kw) -> subprocess.Popen:
    """The command in a terminal's conditions: Ctrl-C (SIGINT) works even when the test run was started in
    the background, where a shell leaves SIGINT ignored for its children."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **kw.pop("env", {}))
    return subprocess.Popen([*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_sigint, **kw)  # fmt: skip


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_refused(proc: subprocess.CompletedProcess, status: int, *words: str) -> str:
    """A clean refusal: the exit status, no traceback, the error on one line that holds ``words``."""
    err = proc.stderr
    assert proc.returncode == status, (proc.returncode, proc.stdout, err)
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def jobs_seen(log: str) -> int:
    """Jobs a service (log level info) started: the worker logs one line per job."""
    return sum(
        1 for line in log.splitlines() if "krita_sdxl.backend.service.worker: job" in line and ": refine " in line
    )


def rgba_picture(path: Path, width: int = 101, height: int = 67) -> Path:
    im = PILImage.linear_gradient("L").resize((width, height)).convert("RGBA")
    im.putalpha(PILImage.linear_gradient("L").rotate(90).resize((width, height)))
    im.save(path)
    return path


def ramp16(width: int, height: int, channels: int, seed: int = 0) -> np.ndarray:
    """16-bit values that use the low byte (no multiple-of-257 8-bit look-alikes)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 65536, (height, width, channels), dtype=np.uint16)


def write_ppm16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PPM/PGM written byte by byte (a format too simple to get wrong), for ImageMagick to convert."""
    h, w, c = values.shape
    magic = {1: "P5", 3: "P6"}[c]
    path.write_bytes(f"{magic} {w} {h} 65535\n".encode() + values.astype(">u2").tobytes())
    return path


def magick(*args: str) -> None:
    subprocess.run(["convert", *args], check=True, capture_output=True, timeout=60)


def magick_samples(path: Path, channels: str, width: int, height: int) -> np.ndarray:
    """Pixel values as ImageMagick reads them: 16-bit, channels 'gray', 'rgb' or 'rgba'."""
    out = subprocess.run(
        ["convert", str(path), "-depth", "16", "-endian", "MSB", f"{channels}:-"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    n = {"gray": 1, "rgb": 3, "rgba": 4}[channels]
    return np.frombuffer(out, ">u2").reshape(height, width, n)
