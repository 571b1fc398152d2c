"""An upscaler model file (ESRGAN, SwinIR and the other families ``spandrel`` knows) as an upscale job's
first stage: ``serve --upscaler FILE`` (and ``refine --local --upscaler FILE``).

:func:`load_upscaler` reads a local ``.pth`` / ``.safetensors`` file with spandrel (which detects the
architecture from the weights, and unpickles ``.pth`` files with a restricted unpickler: no code runs)
and refuses, naming the file, anything that is not a super-resolution model for colour pictures.
:meth:`UpscalerModel.enlarge` runs it on the picture in tiles (so its memory is that of a tile, whatever
the picture), then resizes each tile's result with Lanczos to the job's exact size: a 4x model serves a
2x job. The picture reaches the model as the refiner gets it (sRGB in [0, 1], transparent pixels
filled, float highlights tone-mapped); alpha is enlarged with Lanczos. ``spandrel`` is an optional
extra: ``pip install 'krita-sdxl[upscale]'``.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from krita_sdxl.protocol import Image

from ..setup.plan.upscalers import file_problem
from . import pixels
from .lanczos import put, resize_plane
from .request import JobCancelled, StopFn
from .upscale import model_input, source_tone, write_colour

log = logging.getLogger(__name__)

OUTPUT_TILE = 512  # px of the result per model call
MARGIN = 16  # source px around each tile, so the model's borders do not show


class UpscalerError(ValueError):
    """The file cannot serve as an upscaler; the message names the file and why."""


@dataclass
class UpscalerModel:
    path: Path
    descriptor: Any  # spandrel's ImageModelDescriptor
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    @property
    def architecture(self) -> str:
        return str(self.descriptor.architecture.name)

    def describe(self) -> dict[str, Any]:
        """``welcome.capabilities.upscale.model``."""
        return {"name": self.path.name, "architecture": self.architecture, "scale": self.scale}

    def to(self, device: str, half: bool = False) -> UpscalerModel:
        """Move it to the engine's device (half precision on a GPU where the architecture allows it)."""
        self.device = device
        self.dtype = (
            torch.float16 if half and device.startswith("cuda") and self.descriptor.supports_half else torch.float32
        )
        self.descriptor.to(torch.device(device)).to(self.dtype)
        self.descriptor.eval()
        return self

    def _run(self, rgb: np.ndarray) -> np.ndarray:
        """The model on an HxWx3 float32 picture in [0, 1]: (H*scale) x (W*scale) x 3 float32."""
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].to(self.device, self.dtype)
        with torch.inference_mode():
            y = self.descriptor(x)
        return y[0].float().permute(1, 2, 0).cpu().numpy()

    def enlarge(self, image: Image, size: tuple[int, int], transfer: str, should_stop: StopFn) -> np.ndarray:
        """``image`` enlarged to ``size`` = (width, height) by the model, in the image's own format
        (a new height x width x channels array of its samples, as :func:`.lanczos.lanczos` returns)."""
        spec = image.spec
        width, height = size
        sx, sy = spec.width / width, spec.height / height  # source px per result px
        samples = pixels.samples(image)
        tone = source_tone(image)
        source = model_input(samples, spec, tone, transfer)
        out = np.empty((height, width, spec.channels), dtype=samples.dtype)
        if spec.has_alpha:
            index = spec.order.index("A")
            alpha = pixels.to_rgb_alpha(image)[1]
            assert alpha is not None
            put(out[..., index], np.clip(resize_plane(alpha, size), 0.0, 1.0), spec)
        s = self.scale
        for y0 in range(0, height, OUTPUT_TILE):
            for x0 in range(0, width, OUTPUT_TILE):
                if should_stop():
                    raise JobCancelled()
                x1, y1 = min(x0 + OUTPUT_TILE, width), min(y0 + OUTPUT_TILE, height)
                left, top = max(0, math.floor(x0 * sx) - MARGIN), max(0, math.floor(y0 * sy) - MARGIN)
                right = min(spec.width, math.ceil(x1 * sx) + MARGIN)
                bottom = min(spec.height, math.ceil(y1 * sy) + MARGIN)
                big = self._run(source[top:bottom, left:right])
                box = ((x0 * sx - left) * s, (y0 * sy - top) * s, (x1 * sx - left) * s, (y1 * sy - top) * s)
                rgb = np.stack([resize_plane(big[..., c], (x1 - x0, y1 - y0), box) for c in range(3)], axis=-1)
                write_colour(np.clip(rgb, 0.0, 1.0), out[y0:y1, x0:x1], spec, tone, transfer)
        return out


def _stand_in_for_torchvision() -> dict[str, Any]:
    """Modules that stand in for torchvision while spandrel imports (see :func:`import_spandrel`)."""
    import enum
    import importlib.machinery
    import types

    def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("this architecture needs torchvision, which does not import with this PyTorch")

    root, transforms, functional = (types.ModuleType(n) for n in TORCHVISION_MODULES)
    functional.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")  # type: ignore[attr-defined]
    functional.rotate = functional.normalize = unavailable  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    root.transforms = transforms  # type: ignore[attr-defined]
    modules: dict[str, Any] = dict(zip(TORCHVISION_MODULES, (root, transforms, functional), strict=True))
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return modules


TORCHVISION_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def import_spandrel(file: Path) -> Any:
    """spandrel, or UpscalerError naming ``file`` when it is not installed. spandrel imports torchvision for
    two architectures that are no upscalers (LaMa inpainting and RestoreFormer face restoration use three of
    its functions); where torchvision is missing or does not match this PyTorch (the CUDA build of
    torchvision beside a CPU PyTorch fails to import), those two get a stand-in that refuses to run, only
    while spandrel imports: every upscaler architecture loads and runs without torchvision."""
    try:
        import spandrel
    except ModuleNotFoundError as exc:
        if exc.name != "torchvision":
            raise UpscalerError(
                f"{file}: upscaler models need the spandrel library: pip install 'krita-sdxl[upscale]'"
            ) from None
    except RuntimeError:  # a torchvision that does not match this PyTorch failed inside its own import
        pass
    else:
        return spandrel
    for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "spandrel")]:
        del sys.modules[name]  # what the failed imports left half-made
    stand_in = _stand_in_for_torchvision()
    sys.modules.update(stand_in)
    try:
        import spandrel
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)
    log.info("spandrel imported without torchvision (missing or not this PyTorch's build)")
    return spandrel


def load_upscaler(path: str | Path) -> UpscalerModel:
    """The upscaler in ``path``, on the CPU; :class:`UpscalerError` names the file and the problem."""
    file = Path(path).expanduser()
    problem = file_problem(file)
    if problem is not None:
        raise UpscalerError(problem)
    spandrel = import_spandrel(file)
    try:
        descriptor = spandrel.ModelLoader().load_from_file(file)
    except spandrel.UnsupportedModelError:
        raise UpscalerError(
            f"{file} is not an upscaler model: its weights match none of the architectures spandrel knows "
            "(ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ...)"
        ) from None
    except Exception as exc:  # a broken pickle, safetensors header, zip or tensor: whatever the file held
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UpscalerError(f"{file} cannot be read as a model file ({type(exc).__name__}: {first})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscalerError(f"{file} is a {descriptor.purpose} model ({descriptor.architecture.name}), not an upscaler")
    if descriptor.purpose not in ("SR",) or descriptor.scale < 2:
        what = f"a {descriptor.scale}x {descriptor.purpose.lower()} model"
        raise UpscalerError(f"{file} is {what} ({descriptor.architecture.name}), not an upscaler (2x or more)")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UpscalerError(
            f"{file} takes {descriptor.input_channels} and gives {descriptor.output_channels} channels; "
            "an upscaler for colour pictures takes and gives 3"
        )
    model = UpscalerModel(file, descriptor.eval())
    log.info("upscaler %s: %s, %dx", file, model.architecture, model.scale)
    return model
