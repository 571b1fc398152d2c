"""What the machine has for PyTorch: OS, CPU architecture, the NVIDIA driver's CUDA version, ROCm.

The facts come from running ``nvidia-smi`` and reading ROCm's version file; the parsers here are pure
(the plugin runs ``nvidia-smi`` with QProcess, :func:`gather` with subprocess for the CLI).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

_CUDA = re.compile(r"CUDA Version\s*:\s*(\d+)\.(\d+)")
_GPU_ROW = re.compile(r"^\|\s+\d+\s+(.+?)\s{2,}(?:On|Off)\s+\|", re.MULTILINE)
_GPU_LIST = re.compile(r"^GPU \d+:\s*(.+?)\s*(?:\(UUID:.*)?$", re.MULTILINE)
_VERSION = re.compile(r"(\d+)\.(\d+)")
ROCM_VERSION_FILES = ("/opt/rocm/.info/version",)
NVIDIA_SMI_TIMEOUT_S = 15


@dataclass(frozen=True)
class Machine:
    system: str  # platform.system(): Windows, Darwin, Linux
    arch: str  # normalised: x86_64 or arm64
    cuda: tuple[int, int] | None = None  # the newest CUDA the NVIDIA driver supports (nvidia-smi)
    gpus: tuple[str, ...] = field(default=())
    rocm: tuple[int, int] | None = None  # ROCm installed and an AMD GPU device present

    @property
    def summary(self) -> str:
        os_name = {"Darwin": "macOS"}.get(self.system, self.system)
        parts = [f"{os_name} {self.arch}"]
        if self.gpus:
            parts.append(", ".join(self.gpus))
        if self.cuda:
            parts.append(f"NVIDIA driver for CUDA {self.cuda[0]}.{self.cuda[1]}")
        if self.rocm:
            parts.append(f"ROCm {self.rocm[0]}.{self.rocm[1]}")
        if self.system == "Darwin" and self.arch == "arm64":
            parts.append("Apple silicon (MPS)")
        return ", ".join(parts)


def normalise_arch(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)


def parse_nvidia_smi(output: str) -> tuple[tuple[int, int] | None, tuple[str, ...]]:
    """(CUDA version the driver supports, GPU names) from ``nvidia-smi``'s table (or ``-L``) output."""
    match = _CUDA.search(output)
    cuda = (int(match.group(1)), int(match.group(2))) if match else None
    names = [n.strip() for n in _GPU_ROW.findall(output)] or [n.strip() for n in _GPU_LIST.findall(output)]
    return cuda, tuple(n for n in names if n)


def parse_rocm_version(text: str) -> tuple[int, int] | None:
    """``6.4.1-120`` (``/opt/rocm/.info/version``) -> (6, 4)."""
    match = _VERSION.search(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def read_rocm(system: str) -> tuple[int, int] | None:
    """ROCm's version when it is installed and an AMD GPU is there (``/dev/kfd``); Linux only."""
    if system != "Linux" or not os.path.exists("/dev/kfd"):
        return None
    roots = [os.environ.get("ROCM_PATH", "")] if os.environ.get("ROCM_PATH") else []
    files = [str(Path(r) / ".info" / "version") for r in roots] + list(ROCM_VERSION_FILES)
    for path in files:
        try:
            version = parse_rocm_version(Path(path).read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
        if version:
            return version
    return None


def gather() -> Machine:
    """This machine's facts (for the CLI; the plugin gathers them without blocking Krita)."""
    system = platform.system()
    cuda, gpus = None, ()
    smi = shutil.which("nvidia-smi")
    if smi and system != "Darwin":
        try:
            done = subprocess.run([smi], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
            cuda, gpus = parse_nvidia_smi(done.stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    return Machine(system, normalise_arch(platform.machine()), cuda, gpus, read_rocm(system))
