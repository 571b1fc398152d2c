"""The PyTorch build for a machine: pinned version, build (CUDA, ROCm, Apple MPS, CPU) and its index.

PyPI's ``torch`` is a CUDA build on Linux and a CPU build on Windows, so the setup always names the
build and takes it from PyTorch's own index (``download.pytorch.org/whl/<build>``), pinned to
:data:`TORCH_VERSION` with the build's local label (``torch==2.13.0+cu128``). macOS has one build,
from PyPI. ``index="pip"`` uses whatever pip is configured with instead (a company mirror, a local
wheel folder) and drops the label: ``torch==2.13.0``.

:data:`CUDA_BUILDS` and :data:`ROCM_BUILDS` are the builds published for :data:`TORCH_VERSION`;
update the three together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .machine import Machine

TORCH_VERSION = "2.13.0"
PYTORCH_INDEX = "https://download.pytorch.org/whl/{build}"
# (build, the oldest CUDA the NVIDIA driver must support), newest first.
CUDA_BUILDS = (("cu130", (13, 0)), ("cu128", (12, 8)), ("cu126", (12, 6)))
ROCM_BUILDS = (("rocm7.1", (7, 1)), ("rocm6.4", (6, 4)))
BUILDS = ("auto", *(b for b, _ in CUDA_BUILDS), *(b for b, _ in ROCM_BUILDS), "cpu")
USE_PIP_CONFIG = "pip"

# About what each kind of build downloads and takes installed (torch and the libraries it pulls).
_SIZES = {"cuda": (3_300_000_000, 7_000_000_000), "rocm": (4_500_000_000, 14_000_000_000),
          "cpu": (200_000_000, 900_000_000), "mps": (80_000_000, 350_000_000)}  # fmt: skip
WINDOWS_CUDA_SIZES = (2_900_000_000, 5_500_000_000)
# diffusers, transformers, numpy, pillow, accelerate, huggingface_hub, safetensors, pyzmq, ...
OTHER_PACKAGES = (150_000_000, 600_000_000)


class SetupProblem(Exception):
    """The setup cannot go on: ``why`` it cannot and ``what`` the person can do about it."""

    def __init__(self, why: str, what: str) -> None:
        super().__init__(f"{why} {what}")
        self.why = why
        self.what = what


@dataclass(frozen=True)
class TorchChoice:
    build: str  # cu128, rocm6.4, cpu, mps
    device: str  # what the backend will run on: cuda, rocm, mps, cpu
    requirement: str  # torch==2.13.0+cu128
    index_url: str | None  # None: pip's configured index (PyPI unless configured otherwise)
    reason: str  # why this build, for people
    warning: str | None = None  # e.g. CPU only: slow
    download_bytes: int = 0
    install_bytes: int = 0

    @property
    def label(self) -> str:
        names = {"cpu": "CPU only", "mps": "Apple MPS"}
        if self.build.startswith("cu"):
            name = f"CUDA {self.build[2:-1]}.{self.build[-1]}"
        elif self.build.startswith("rocm"):
            name = f"ROCm {self.build[4:]}"
        else:
            name = names.get(self.build, self.build)
        return f"PyTorch {TORCH_VERSION} ({name})"

    @property
    def pip_args(self) -> list[str]:
        return [self.requirement, *(["--index-url", self.index_url] if self.index_url else [])]


def _newest(builds: tuple[tuple[str, tuple[int, int]], ...], have: tuple[int, int]) -> str | None:
    return next((build for build, need in builds if have >= need), None)


def _cpu_warning(why: str) -> str:
    return f"{why}: the CPU build is installed, and a refine takes minutes instead of seconds."


def choose_torch(
    machine: Machine, build: str = "auto", index: str | None = None, redo: str = "click Repair"
) -> TorchChoice:
    """The build for ``machine``. ``build``: auto, or one of :data:`BUILDS` to force it. ``index``:
    None for PyTorch's index, ``"pip"`` for pip's own configuration, or an index URL. ``redo``: how the
    warnings say to run this step again (the docker's button; the CLI names its command).
    Raises :class:`SetupProblem` where PyTorch has no build at all."""
    system, arch = machine.system, machine.arch
    if build not in BUILDS:
        raise SetupProblem(f"Unknown PyTorch build {build!r}.", f"Choose one of {', '.join(BUILDS)}.")
    if system == "Darwin":
        if arch != "arm64":
            raise SetupProblem(
                "PyTorch publishes no builds for Intel Macs any more.",
                "Run the backend on another computer (`krita-sdxl setup` there) and connect to it.",
            )
        return _make("mps", "mps", machine, "Apple silicon: PyTorch's macOS build uses the GPU through MPS",
                     None, index, pypi=True)  # fmt: skip
    if system not in ("Linux", "Windows") or arch not in ("x86_64", "arm64"):
        raise SetupProblem(
            f"PyTorch has no build for {system} on {arch}.",
            "Run the backend on a Linux, Windows or macOS (Apple silicon) computer and connect to it.",
        )
    if build != "auto":
        device = "cuda" if build.startswith("cu") else "rocm" if build.startswith("rocm") else "cpu"
        warning = _cpu_warning("Chosen by hand") if device == "cpu" else None
        return _make(build, device, machine, f"{build} chosen by hand", warning, index)
    if machine.cuda:
        chosen = _newest(CUDA_BUILDS, machine.cuda)
        have = f"{machine.cuda[0]}.{machine.cuda[1]}"
        if chosen:
            return _make(chosen, "cuda", machine, f"the NVIDIA driver supports CUDA {have}", None, index)
        oldest = CUDA_BUILDS[-1][1]
        return _make("cpu", "cpu", machine, "the NVIDIA driver is too old", _cpu_warning(
            f"The NVIDIA driver supports CUDA {have}; PyTorch {TORCH_VERSION} needs {oldest[0]}.{oldest[1]} or "
            f"newer. Update the NVIDIA driver and {redo} to get the GPU build. Until then"), index)  # fmt: skip
    if machine.rocm and system == "Linux" and arch == "x86_64":
        chosen = _newest(ROCM_BUILDS, machine.rocm)
        have = f"{machine.rocm[0]}.{machine.rocm[1]}"
        if chosen:
            return _make(chosen, "rocm", machine, f"ROCm {have} is installed", None, index)
        return _make("cpu", "cpu", machine, "ROCm is too old", _cpu_warning(
            f"ROCm {have} is older than PyTorch's oldest ROCm build ({ROCM_BUILDS[-1][0]})"), index)  # fmt: skip
    return _make("cpu", "cpu", machine, "no GPU PyTorch can use was found", _cpu_warning(
        "No NVIDIA GPU (nvidia-smi) or AMD GPU with ROCm was found"), index)  # fmt: skip


def _make(
    build: str, device: str, machine: Machine, reason: str, warning: str | None, index: str | None, pypi: bool = False
) -> TorchChoice:
    # PyPI's Linux arm64 CPU wheel is the CPU build; PyTorch's cpu index names it without a label.
    plain = pypi or index == USE_PIP_CONFIG or (build == "cpu" and machine.arch == "arm64")
    requirement = f"torch=={TORCH_VERSION}" if plain else f"torch=={TORCH_VERSION}+{build}"
    if index == USE_PIP_CONFIG:
        url = None
    elif index:
        url = index
    else:
        url = None if pypi or (build == "cpu" and machine.arch == "arm64") else PYTORCH_INDEX.format(build=build)
    kind = "cuda" if device == "cuda" else device
    download, install = _SIZES[kind]
    if kind == "cuda" and machine.system == "Windows":
        download, install = WINDOWS_CUDA_SIZES
    return TorchChoice(build, device, requirement, url, reason, warning, download, install)


_LOCAL = re.compile(r"^(?P<base>[^+]+)(?:\+(?P<label>.+))?$")


def fits(installed: str | None, choice: TorchChoice, system: str) -> tuple[bool, str]:
    """Does the installed torch (its version string, ``2.13.0+cu128``) give this machine ``choice``'s
    device? (ok, what to tell the person)."""
    if not installed:
        return False, "PyTorch is not installed"
    match = _LOCAL.match(installed.strip())
    base, label = (match.group("base"), match.group("label")) if match else (installed, None)
    if label:
        kind = "cuda" if label.startswith("cu") else "rocm" if label.startswith("rocm") else label
    elif system == "Linux":
        kind = "cuda"  # PyPI's Linux build
    elif system == "Darwin":
        kind = "mps"
    else:
        kind = "cpu"  # PyPI's Windows build
    if kind != choice.device:
        return False, f"PyTorch {installed} is a {kind} build; this machine wants {choice.label}"
    if base != TORCH_VERSION:
        return True, f"PyTorch {installed} fits this machine (the setup pins {TORCH_VERSION})"
    return True, f"PyTorch {installed} fits this machine"
