"""The ``fp8`` speed level's quantisation: torchao float8 dynamic quantisation (activations and weights,
``Float8DynamicActivationFloat8WeightConfig``) of the UNet's transformer linear layers, run under the
regional ``torch.compile`` (backend/speed/speed_path.py).

Why torchao and not nvidia-modelopt + TensorRT: torchao installs from PyPI as one small wheel and works
inside the compile path the service already has (no ONNX export, no second engine format, no
calibration set: the scales are computed per call); modelopt's FP8 deployment needs TensorRT, whose
builder libraries PyPI does not carry (the ``tensorrt-cu13-libs`` there is a stub that downloads them
from NVIDIA's index). torchao float8 covers ``nn.Linear`` only: the convolutions stay in fp16.

Which layers: every ``nn.Linear`` of the attention blocks (``proj_in``/``proj_out`` and everything in
``transformer_blocks``: attention projections and the feed-forward) whose sides are multiples of 16
(what the float8 matmul needs). Not the time and text embeddings (a few rows each: quantising them
costs more than it saves). In the SDXL refiner those layers hold about half the UNet's FLOPs at 1024 px.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

GRANULARITIES = ("tensor", "row")


def is_fp8_linear(module: torch.nn.Module, fqn: str) -> bool:
    """Whether the layer at ``fqn`` is quantised."""
    if not isinstance(module, torch.nn.Linear):
        return False
    name = f".{fqn}."
    if ".transformer_blocks." not in name and not fqn.endswith((".proj_in", ".proj_out")):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def fp8_layers(unet: torch.nn.Module) -> list[str]:
    return [fqn for fqn, m in unet.named_modules() if is_fp8_linear(m, fqn)]


def _torchao_quantize(unet: torch.nn.Module, granularity: str) -> None:
    from torchao.quantization import (  # pyright: ignore[reportMissingImports]  (the optional fp8 extra)
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow() if granularity == "row" else PerTensor(),
        set_inductor_config=False,  # its settings (coordinate-descent tuning) lengthen compilation
    )
    quantize_(unet, config, filter_fn=is_fp8_linear)


def quantize_unet(
    unet: torch.nn.Module, granularity: str = "tensor", quantize: Callable[[torch.nn.Module, str], Any] | None = None
) -> tuple[int, str | None]:
    """Quantise ``unet``'s layers in place: (layers quantised, None) or (0, why not). Per-tensor scales by
    default (the float8 matmul takes them with fp16 outputs; per-row ones need bf16 on some releases).
    torchao checks the GPU's float8 support on the first layer, so on a GPU without it nothing changes;
    a failure further on may leave some layers quantised (they still compute the same function)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"fp8 granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    layers = fp8_layers(unet)
    if not layers:
        return 0, "the UNet has no linear layer float8 can take"
    try:
        (quantize or _torchao_quantize)(unet, granularity)
    except Exception as exc:
        return 0, f"torchao float8 failed: {type(exc).__name__}: {exc}"[:500]
    return len(layers), None


__all__ = ["GRANULARITIES", "fp8_layers", "is_fp8_linear", "quantize_unet"]
