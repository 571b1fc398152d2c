"""``refine --upscale FACTOR`` / ``--upscale-to WxH`` / ``--upscale-method``: the typed text to the
``submit.upscale`` field (the result's size in pixels, protocol/upscale.py), with the mistakes people make
named in one line: ``2x``, ``x2``, ``200%`` and ``1.5`` are factors; ``4096x3072``, ``4096X3072``,
``4096*3072``, ``4096 x 3072``, ``4096x`` (a width) and ``x3072`` (a height) are sizes, fitted inside
keeping the picture's aspect, as ImageMagick's ``-resize WxH`` does."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

from krita_sdxl.backend.common.config import ConfigError
from krita_sdxl.protocol.images import MAX_SIDE
from krita_sdxl.protocol.upscale import METHODS, fit_size, scaled_size

_SIZE = re.compile(r"^\s*(\d*)\s*(?:[x×*]\s*(\d*))?\s*(?:px)?\s*$", re.IGNORECASE)


def add_flags(group: Any) -> None:
    group.add_argument("--upscale", metavar="FACTOR", help="enlarge by FACTOR (1.5, 2, 3, 4, ...), then refine in "
                       "tiles at the refiner's size; --strength 0 gives the enlargement alone")  # fmt: skip
    group.add_argument("--upscale-to", metavar="WxH", help="enlarge to fit WxH (4096x3072; 4096x = a width, x3072 = "
                       "a height), keeping the aspect, then refine as --upscale")  # fmt: skip
    group.add_argument("--upscale-method", choices=METHODS, help="how to enlarge before refining: lanczos, model "
                       "(the service's --upscaler file) or auto = the model if it has one (default: auto)")  # fmt: skip


def parse_factor(text: str) -> float:
    raw = text.strip().lower().replace("×", "x")
    percent = raw.endswith("%")
    number = raw.rstrip("%").strip().removesuffix("x").removeprefix("x").strip()
    try:
        factor = float(number) / (100.0 if percent else 1.0)
    except ValueError:
        factor = math.nan
    if not math.isfinite(factor) or factor <= 0:
        raise ConfigError(f"--upscale must be a factor such as 2 or 1.5, got {text!r}")
    if factor < 1.0:
        raise ConfigError(f"--upscale {text}: an upscale only enlarges; give a factor of 1 or more")
    return factor


def parse_size(text: str) -> tuple[int | None, int | None]:
    match = _SIZE.match(text)
    if not match or not (match.group(1) or match.group(2)):
        raise ConfigError(
            f"--upscale-to must look like 4096x3072 (or 4096x for a width, x3072 for a height), got {text!r}"
        )
    width, height = (int(v) if v else None for v in match.groups())
    if width == 0 or height == 0:
        raise ConfigError(f"--upscale-to {text}: a side of 0 pixels")
    return width, height


def upscale_field(args: argparse.Namespace, width: int, height: int, name: str) -> dict[str, Any]:
    """The ``upscale`` submit field for a picture of ``width`` x ``height`` (called ``name`` in messages),
    or nothing without --upscale / --upscale-to."""
    factor, target, method = (getattr(args, k, None) for k in ("upscale", "upscale_to", "upscale_method"))
    if factor is None and target is None:
        if method is not None:
            raise ConfigError("--upscale-method applies only with --upscale or --upscale-to")
        return {}
    if factor is not None and target is not None:
        raise ConfigError("give --upscale (a factor) or --upscale-to (a size), not both")
    if factor is not None:
        size = scaled_size(width, height, parse_factor(factor))
    else:
        box = parse_size(str(target))
        try:
            size = fit_size(width, height, *box)
        except ValueError:
            raise ConfigError(
                f"--upscale-to {target} is smaller than {name} ({width}x{height}); an upscale only enlarges"
            ) from None
    if max(size) > MAX_SIDE:
        raise ConfigError(
            f"upscaling {name} ({width}x{height}) to {size[0]}x{size[1]}: a side is over {MAX_SIDE} pixels, "
            "the most a picture may have"
        )
    return {"upscale": {"width": size[0], "height": size[1], "method": method or "auto"}}
