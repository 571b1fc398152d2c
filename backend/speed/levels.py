"""``--speed`` levels and the choice of the level that runs: a pure function of what the machine has.

Levels, from slowest to fastest (each is a :class:`Plan` of what the speed path does):

- ``off``: the plain eager path.
- ``compile``: regional ``torch.compile`` of the UNet's and the VAE's blocks (backend/speed/speed_path.py).
- ``trt``: the refiner UNet as a TensorRT FP16 engine per size bucket (static shapes), built in the
  background while jobs run eager; the VAE compiled as in ``compile``. Needs CUDA, ``tensorrt`` and ``onnx``.
- ``fp8``: torchao float8 dynamic quantisation (activations and weights) of the UNet's transformer linear
  layers, under the regional compile. Needs CUDA with compute capability 8.9 or higher (Ada, Hopper),
  ``torchao`` and Triton.
- ``draft``: ``compile`` plus a DeepCache-style step cache (the deep UNet features reused between steps):
  the fastest, and the only lossy level. Opt-in; without Triton it still caches steps, uncompiled.

``auto`` means ``compile`` on CUDA and ``off`` elsewhere, ``on`` means ``compile`` anywhere (as before
the levels existed). A level whose library, GPU or GPU feature is missing steps down the ladder
``fp8 -> trt -> compile -> off`` until one can run; :func:`choose` says why in one line.

Pure: :class:`Capabilities` is plain data; :func:`probe` (the only part that imports torch or the
libraries) fills it for a real device.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

LEVELS = ("off", "compile", "trt", "fp8", "draft")
ALIASES = ("auto", "on")
CHOICES = (*ALIASES, *LEVELS)
LADDER = ("fp8", "trt", "compile", "off")  # a level that cannot run steps down to the next one
FP8_MIN_CAPABILITY = (8, 9)  # float8 matmuls: Ada (8.9) and Hopper (9.0) and later
# The libraries each level imports (besides torch): checked by probe(), looked up by why_not().
LIBRARIES: dict[str, tuple[str, ...]] = {
    "compile": ("triton",),  # on CUDA only: inductor's GPU code generator
    "trt": ("tensorrt", "onnx"),
    "fp8": ("torchao", "triton"),
}
INSTALL_HINTS = {
    "triton": "pip install triton",
    "tensorrt": "pip install tensorrt-cu13 (its libraries come from NVIDIA's package index)",
    "onnx": "pip install onnx onnxscript",
    "torchao": "pip install torchao",
}


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers the speed levels."""

    device: str  # "cuda", "cuda:1", "cpu", "mps"
    capability: tuple[int, int] | None = None  # CUDA compute capability
    gpu: str | None = None  # the GPU's name
    missing: dict[str, str] = field(default_factory=dict)  # library -> why it cannot be used
    offloaded: bool = False  # the UNet's weights move between calls (memory modes model, sequential)

    @property
    def cuda(self) -> bool:
        return self.device.split(":", 1)[0] == "cuda"


@dataclass(frozen=True)
class Plan:
    """What the speed path does for one level."""

    level: str  # the level that runs (one of LEVELS)
    requested: str  # the setting as given (one of CHOICES)
    compile: bool = False  # regional torch.compile (of the VAE always; of the UNet unless it is TensorRT)
    unet: str = "torch"  # "torch", "trt" (TensorRT engines) or "fp8" (torchao float8 linears)
    step_cache: bool = False  # DeepCache-style reuse of deep UNet features (lossy)
    buckets: bool = False  # pad work images to size buckets (static shapes: one engine per bucket)
    reasons: tuple[str, ...] = ()  # why the requested level did not run, one per step down

    @property
    def enabled(self) -> bool:
        return self.level != "off"

    def summary(self) -> str | None:
        """One log line when the level that runs is not the one asked for, else None."""
        if not self.reasons:
            return None
        return f"speed {self.requested} runs as {self.level}: " + "; ".join(self.reasons)


def why_not(level: str, caps: Capabilities) -> str | None:
    """Why ``level`` cannot run on ``caps`` (None: it can)."""
    if level == "off" or level == "draft":
        return None
    if caps.offloaded:
        return f"{level} needs the UNet's weights to stay on the GPU (the memory mode offloads them)"
    if level in ("trt", "fp8") and not caps.cuda:
        what = "TensorRT" if level == "trt" else "FP8"
        return f"{what} needs an NVIDIA GPU (device {caps.device})"
    if level == "fp8":
        cc = caps.capability
        if cc is None or tuple(cc) < FP8_MIN_CAPABILITY:
            have = f"{cc[0]}.{cc[1]}" if cc else "unknown"
            gpu = f", {caps.gpu}" if caps.gpu else ""
            return f"FP8 needs compute capability 8.9 or higher (Ada, Hopper); this GPU is {have}{gpu}"
    for lib in LIBRARIES.get(level, ()):
        if lib == "triton" and not caps.cuda:
            continue  # inductor generates C++ on the CPU
        if lib in caps.missing:
            return f"{level}: {caps.missing[lib]}"
    return None


def _alias(setting: str, caps: Capabilities) -> str:
    if setting == "auto":
        return "compile" if caps.cuda else "off"
    if setting == "on":
        return "compile"
    return setting


def choose(setting: str, caps: Capabilities) -> Plan:
    """The plan for ``--speed setting`` on ``caps``: the requested level, or the first one down
    :data:`LADDER` that can run, with the reasons for each step down."""
    if setting not in CHOICES:
        raise ValueError(f"speed must be one of {', '.join(CHOICES)}; got {setting!r}")
    level = _alias(setting, caps)
    reasons: list[str] = []
    if level == "draft":
        why = why_not("compile", caps)
        if why is not None:
            reasons.append(f"the step cache runs uncompiled ({why})")
        return Plan("draft", setting, compile=why is None, step_cache=True, reasons=tuple(reasons))
    for candidate in LADDER[LADDER.index(level) :]:
        why = why_not(candidate, caps)
        if why is None:
            return _plan(candidate, setting, tuple(reasons))
        reasons.append(why)
    raise AssertionError("off always runs")  # pragma: no cover


def _plan(level: str, requested: str, reasons: tuple[str, ...]) -> Plan:
    if level == "off":
        return Plan("off", requested, reasons=reasons)
    if level == "trt":
        return Plan("trt", requested, compile=True, unet="trt", buckets=True, reasons=reasons)
    if level == "fp8":
        return Plan("fp8", requested, compile=True, unet="fp8", reasons=reasons)
    return Plan("compile", requested, compile=True, reasons=reasons)


def enabled(setting: str, device: str) -> bool:
    """Whether ``setting`` asks for any speed path on ``device`` (before libraries are looked at)."""
    return _alias(setting, Capabilities(device)) != "off"


# --- the thin adapter: what this machine has ------------------------------------------------------


def _import_problem(name: str) -> str | None:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        hint = INSTALL_HINTS.get(name, f"pip install {name}")
        detail = "" if isinstance(exc, ModuleNotFoundError) and exc.name == name else f": {exc}"
        return f"{name} is not installed ({hint}){detail}"[:300]
    except Exception as exc:  # a broken install (wrong CUDA, wrong torch): as good as missing
        return f"{name} failed to import: {type(exc).__name__}: {exc}"[:300]
    return None


def probe(device: str, setting: str, offloaded: bool = False) -> Capabilities:
    """The capabilities that matter for ``setting`` on ``device``: the compute capability and the
    libraries of every level on its way down the ladder (only those are imported)."""
    level = _alias(setting, Capabilities(device))
    wanted: list[str] = []
    chain = ("compile",) if level == "draft" else LADDER[LADDER.index(level) :] if level in LADDER else ()
    for lvl in chain:
        wanted += [lib for lib in LIBRARIES.get(lvl, ()) if lib not in wanted]
    cuda = device.split(":", 1)[0] == "cuda"
    if not cuda:
        wanted = [lib for lib in wanted if lib != "triton"]
    missing = {lib: why for lib in wanted if (why := _import_problem(lib)) is not None}
    capability = gpu = None
    if cuda:
        import torch

        index = torch.device(device).index
        capability = tuple(torch.cuda.get_device_capability(index))  # type: ignore[assignment]
        gpu = torch.cuda.get_device_name(index)
    return Capabilities(device, capability, gpu, missing, offloaded)  # type: ignore[arg-type]


__all__ = [
    "ALIASES",
    "CHOICES",
    "LADDER",
    "LEVELS",
    "Capabilities",
    "Plan",
    "choose",
    "enabled",
    "probe",
    "why_not",
]
