"""Upscale jobs on the wire: the ``submit.upscale`` field, its rules, and the size arithmetic clients share.

A ``submit`` with ``upscale`` = ``{"width", "height", "method"}`` asks for a result of that size: the
image is enlarged (Lanczos, or the service's upscaler model) and then refined at ``strength`` in tiles
at the refiner's native size; ``strength`` 0 returns the enlargement alone. The wire carries the output
size, not a factor, so there is no rounding to agree on: clients turn a factor or a target size into
pixels with :func:`scaled_size` / :func:`fit_size` (the CLI and the docker use these same functions),
and a service that refuses a size names the largest factor that fits (:func:`largest_factor`).
Standard library only (runs in Krita's Python 3.10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import BAD_FIELD, ProtocolError, shown
from .images import MAX_SIDE, check_size_map
from .policy import StepPlan, plan_img2img

METHODS = ("auto", "lanczos", "model")  # auto: the service's upscaler model if it has one, else Lanczos
DEFAULT_METHOD = "auto"
FACTOR_DIGITS = 2  # factors are named to 1/100 (2.83x)


@dataclass(frozen=True)
class UpscaleSpec:
    """The size of an upscale job's result and how the picture is enlarged before it is refined."""

    width: int
    height: int
    method: str = DEFAULT_METHOD

    def to_wire(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "method": self.method}

    @property
    def pixel_count(self) -> int:
        return self.width * self.height

    @classmethod
    def from_wire(cls, value: Any, field: str) -> UpscaleSpec:
        """Validate ``submit.upscale``; errors name ``field.key``."""
        check_size_map(value, field, {"width", "height", "method"}, "width and height (the result's size)")
        method = value.get("method", DEFAULT_METHOD)
        if method not in METHODS:
            raise ProtocolError(
                BAD_FIELD, f"{field}.method must be one of {', '.join(METHODS)}, got {shown(method)}", f"{field}.method"
            )
        return cls(value["width"], value["height"], method)


# --- the rules of a submit that asks for an upscale ------------------------------------------------


def check_submit(fields: dict[str, Any]) -> None:
    """Rules across ``submit`` fields (after each field was checked alone): ``strength`` 0 only with an
    upscale; an upscale refines the whole picture (no mask, no work size, the refine mode) and is no
    smaller than the image on either side."""
    spec: UpscaleSpec | None = fields.get("upscale")
    if spec is None:
        if fields.get("strength") == 0.0:
            raise ProtocolError(
                BAD_FIELD, "strength must be above 0 (strength 0 is only for an upscale: the enlargement alone)",
                "strength",
            )  # fmt: skip
        return
    if fields.get("mode", "refine") != "refine":
        raise ProtocolError(BAD_FIELD, f"upscale works with mode refine only, got mode {shown(fields['mode'])}", "mode")
    if fields.get("mask") is not None:
        raise ProtocolError(
            BAD_FIELD, "upscale takes no mask: send the region to enlarge (a selection's bounds) as the image", "mask"
        )
    if fields.get("work_width") is not None or fields.get("work_height") is not None:
        raise ProtocolError(
            BAD_FIELD,
            "upscale takes no work size: the result's size is upscale.width x upscale.height, refined in tiles",
            "work_width",
        )
    image = fields.get("image")
    if image is not None and (spec.width < image.width or spec.height < image.height):
        raise ProtocolError(
            BAD_FIELD,
            f"upscale to {spec.width}x{spec.height} is smaller than the image ({image.width}x{image.height}) on "
            "a side; an upscale only enlarges",
            "upscale.width" if spec.width < image.width else "upscale.height",
        )


def plan_steps(steps: int, strength: float) -> StepPlan:
    """The step plan of an upscale: strength 0 runs no denoising step (the enlargement alone); any
    other strength follows :func:`~.policy.plan_img2img` (per tile)."""
    if strength == 0.0:
        return StepPlan(steps, 0, False)
    return plan_img2img(steps, strength)


# --- sizes: what clients turn a factor or a target size into ------------------------------------


def _round(value: float) -> int:
    return math.floor(value + 0.5)


def scaled_size(width: int, height: int, factor: float) -> tuple[int, int]:
    """The result's size for ``factor`` (1 or more): each side multiplied and rounded half up."""
    if not math.isfinite(factor) or factor < 1.0:
        raise ValueError(f"an upscale factor must be 1 or more, got {factor!r}")
    return max(width, _round(width * factor)), max(height, _round(height * factor))


def fit_size(width: int, height: int, box_width: int | None, box_height: int | None) -> tuple[int, int]:
    """The largest size with the image's aspect that fits in ``box_width`` x ``box_height`` (either
    may be None: any), as ImageMagick's ``-resize WxH`` does; never smaller than the image."""
    factors = [b / s for b, s in ((box_width, width), (box_height, height)) if b is not None]
    if not factors:
        raise ValueError("a target size needs a width, a height or both")
    factor = min(factors)
    if factor < 1.0:
        raise ValueError(f"{box_width or ''}x{box_height or ''} is smaller than the image ({width}x{height})")
    w, h = scaled_size(width, height, factor)
    return min(w, box_width or w), min(h, box_height or h)  # rounding never overshoots the box


def largest_factor(width: int, height: int, max_pixels: int, max_side: int = MAX_SIDE) -> float | None:
    """The largest factor (to 1/100) whose result fits in ``max_pixels`` and ``max_side``; None when even
    1 does not."""
    if width < 1 or height < 1:
        raise ValueError(f"an image has at least one pixel a side, got {width}x{height}")
    step = 10**FACTOR_DIGITS
    factor = math.floor(min(math.sqrt(max_pixels / (width * height)), max_side / max(width, height)) * step)
    while factor >= step:
        w, h = scaled_size(width, height, factor / step)
        if w * h <= max_pixels and max(w, h) <= max_side:
            return factor / step
        factor -= 1
    return None


def factor_text(factor: float) -> str:
    """``2x``, ``1.5x``, ``2.83x``."""
    return f"{factor:.{FACTOR_DIGITS}f}".rstrip("0").rstrip(".") + "x"


def limit_problem(width: int, height: int, out_width: int, out_height: int, max_pixels: int) -> str | None:
    """Why an upscale of a ``width`` x ``height`` image to ``out_width`` x ``out_height`` exceeds ``max_pixels``
    (None when it fits), naming the largest factor that fits: the service's ``limit`` error and the CLI say this."""
    if out_width * out_height <= max_pixels:
        return None
    best = largest_factor(width, height, max_pixels)
    if best is None:
        fits = "the image itself is as large as that"
    else:
        fit_width, fit_height = scaled_size(width, height, best)
        fits = f"the largest factor that fits is {factor_text(best)} ({fit_width}x{fit_height} from {width}x{height})"
    return (
        f"upscale to {out_width}x{out_height} = {out_width * out_height} pixels; this service returns at most "
        f"{max_pixels}: {fits}"
    )
