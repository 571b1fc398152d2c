"""An upscale from the docker: what is captured, the result's size, and where the result goes. Pure.

The source is the active layer's pixels on the canvas or the visible image, or only the selection's
bounds when there is a selection; no mask is sent (the backend refines the whole enlarged region).
The result's size comes from a factor (1.5x, 2x, 3x, 4x) or a target size the result fits in, keeping
the aspect (the protocol's :func:`scaled_size` / :func:`fit_size`, as the CLI). It goes into a new
document (``new``), or "Scale this document" (``scale``) scales the document by the same factor and adds
the result as a layer where the source now lies. A selection always upscales into a new document.
"""

from __future__ import annotations

from dataclasses import dataclass

from krita_sdxl.protocol.geometry import Box, Extent
from krita_sdxl.protocol.images import MAX_SIDE
from krita_sdxl.protocol.upscale import METHODS, factor_text, fit_size, scaled_size

from .plan import NothingToRefine, RefinePlan

UPSCALE = "upscale"  # the docker's mode
FACTORS = ("1.5", "2", "3", "4")
SIZE = "size"  # the factor choice that means a target size
PLACES = ("new", "scale")
__all__ = ["FACTORS", "METHODS", "PLACES", "SIZE", "UPSCALE", "UpscaleTarget", "plan_capture", "plan_target"]


class UpscaleProblem(Exception):
    """The upscale cannot be sent as set; the message is for the artist."""


@dataclass(frozen=True)
class UpscaleTarget:
    width: int  # the result's size
    height: int
    method: str  # auto, lanczos or model (protocol/upscale.py)
    place: str  # "new" or "scale"
    canvas: Extent  # the document's size when it was captured
    scaled_canvas: Extent  # its size after "Scale this document" (the canvas itself for "new")
    box: Box  # where the result goes: in the new document, or in the scaled one
    label: str  # "2x" or "4096x3072", for names and messages

    def wire(self) -> dict[str, object]:
        """``submit.upscale``."""
        return {"width": self.width, "height": self.height, "method": self.method}


def plan_capture(canvas: Extent, source_bounds: Box, selection: Box | None) -> RefinePlan:
    """The region to send: the selection's bounds, else the source's bounds on the canvas; no mask."""
    area = (selection if selection is not None else source_bounds).clamp(canvas)
    if area.is_empty:
        where = "The selection lies outside the image" if selection is not None else "The layer is empty"
        raise NothingToRefine(f"{where}: there is nothing to upscale.")
    return RefinePlan(area, area.extent, 0.0, False)


def plan_target(
    crop: Box, canvas: Extent, factor: str, box_width: int, box_height: int, method: str, place: str, selection: bool
) -> UpscaleTarget:
    """The result's size and place for a captured ``crop`` of a ``canvas``-sized document."""
    if factor == SIZE:
        try:
            width, height = fit_size(crop.width, crop.height, box_width, box_height)
        except ValueError:
            raise UpscaleProblem(
                f"The target size {box_width}x{box_height} is smaller than the {crop.width}x{crop.height} pixels "
                "to upscale; an upscale only enlarges. Nothing was sent."
            ) from None
        label = f"{width}x{height}"
    else:
        width, height = scaled_size(crop.width, crop.height, float(factor))
        label = factor_text(float(factor))
    if max(width, height) > MAX_SIDE:
        raise UpscaleProblem(
            f"Upscaling {crop.width}x{crop.height} by {label} gives {width}x{height}: over {MAX_SIDE} pixels a side. "
            "Choose a smaller factor or select a part. Nothing was sent."
        )
    fx, fy = width / crop.width, height / crop.height
    where = "new" if selection else place
    if where == "scale":
        scaled = Extent(max(1, round(canvas.width * fx)), max(1, round(canvas.height * fy)))
        box = Box(round(crop.x * fx), round(crop.y * fy), width, height)
    else:
        scaled, box = canvas, Box(0, 0, width, height)
    return UpscaleTarget(width, height, method, where, canvas, scaled, box, label)
