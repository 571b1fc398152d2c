"""The upscaler model the docker offers to download (only on a click): where it comes from and its checksum.

Pure data (standard library only; the plugin carries this module and passes every value to
``krita-sdxl setup upscaler`` explicitly, so the backend downloads exactly what the docker showed).
Real-ESRGAN x4plus is the 4x general-purpose model most Stable Diffusion tools ship or offer; its
weights are published under BSD-3-Clause with the release, and the SHA-256 below is the published file's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODELS_FOLDER = "models"  # in the setup folder: where the docker puts upscaler files
SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")  # what an upscaler model file is called


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be an upscaler model file, naming it (None: it can be tried). The one rule for the
    engine's loader and the docker's ⚙ dialog; what the weights hold is the loader's to say."""
    file = Path(path).expanduser()
    if not file.exists():
        return f"{file}: no such file"
    if file.is_dir():
        return f"{file} is a folder, not a model file"
    if not file.is_file():
        return f"{file} is not a regular file (a pipe or a device), not a model file"
    if file.suffix.lower() not in SUFFIXES:
        return f"{file}: expected a .pth or .safetensors upscaler model file"
    return None


@dataclass(frozen=True)
class UpscalerFile:
    title: str
    name: str  # the file name it is saved as
    url: str
    size: int  # bytes
    sha256: str
    licence: str

    def argv(self) -> list[str]:
        """``krita-sdxl setup upscaler`` arguments that name this file."""
        return ["--name", self.name, "--url", self.url, "--size", str(self.size), "--sha256", self.sha256]


REAL_ESRGAN_X4PLUS = UpscalerFile(
    title="Real-ESRGAN x4plus",
    name="RealESRGAN_x4plus.pth",
    url="https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
    size=67_040_989,
    sha256="4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
    licence="BSD-3-Clause",
)
DEFAULT = REAL_ESRGAN_X4PLUS
