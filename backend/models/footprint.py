"""How many bytes a model's weights take on the device, read from safetensors headers without loading.

Used by ``--memory auto`` to choose a memory mode before anything is loaded. A safetensors file
starts with an 8-byte little-endian header length and a JSON header listing every tensor's dtype
and shape, so the count is exact and costs a few kilobytes of reading.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .memory import Footprint
from .sources import ModelSource

UNET_PREFIX = "model.diffusion_model."  # single-file (SGM) checkpoints
SHARED_PREFIXES = ("first_stage_model.", "conditioner.embedders.1.")  # base: VAE, OpenCLIP bigG
REFINER_SHARED_PREFIXES = ("first_stage_model.", "conditioner.embedders.0.")


def tensor_counts(path: Path) -> dict[str, int]:
    """Element count of every tensor in a safetensors file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _folder_counts(folder: Path, half: bool) -> int:
    files = sorted(folder.glob("*.safetensors"))
    fp16 = [f for f in files if ".fp16." in f.name]
    plain = [f for f in files if ".fp16." not in f.name]
    chosen = fp16 if fp16 and (half or not plain) else plain
    return sum(sum(tensor_counts(f).values()) for f in chosen)


def source_footprint(source: ModelSource, bytes_per_weight: int, shared: bool = False) -> Footprint:
    """Device bytes of ``source``'s weights at ``bytes_per_weight`` (2 for fp16/bf16, 4 for fp32).
    ``shared``: leave out the VAE and text_encoder_2 (it reuses the other model's)."""
    half = bytes_per_weight == 2
    if source.kind == "single_file":
        counts = tensor_counts(source.path)
        unet = sum(n for k, n in counts.items() if k.startswith(UNET_PREFIX))
        skip = REFINER_SHARED_PREFIXES if source.role == "refiner" else SHARED_PREFIXES
        other = sum(
            n for k, n in counts.items() if not k.startswith(UNET_PREFIX) and not (shared and k.startswith(skip))
        )
        return Footprint(unet * bytes_per_weight, other * bytes_per_weight)
    unet = _folder_counts(source.path / "unet", half)
    names = ["text_encoder"] if shared else ["text_encoder", "text_encoder_2", "vae"]
    other = sum(_folder_counts(source.path / n, half) for n in names if (source.path / n).is_dir())
    return Footprint(unet * bytes_per_weight, other * bytes_per_weight)
