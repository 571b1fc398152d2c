"""The docker's Upscale mode between the controller and the document: capture the region, size the result,
and put it where the artist chose (a new document, or this document scaled with the result as a layer).
No Qt, no Krita: the document side is the ``core.document.Adapter`` port."""

from __future__ import annotations

from typing import Any

from krita_sdxl.protocol.geometry import Box, Extent

from ..core.document import Adapter, Capture, Placed
from ..core.jobs import Job
from ..core.pixelformat import any_visible
from ..core.plan import NothingToRefine
from ..core.settings import Settings
from ..core.upscale import UpscaleTarget, plan_capture, plan_target


def capture(adapter: Adapter, s: Settings) -> tuple[Capture, UpscaleTarget]:
    """Read the region to upscale (raises the adapter's and the plan's errors, for the artist)."""
    seen: dict[str, Any] = {}

    def planner(canvas: Extent, source_bounds: Box, selection: Box | None) -> Any:
        seen.update(canvas=canvas, selection=selection is not None)
        return plan_capture(canvas, source_bounds, selection)

    cap = adapter.capture(s.source, planner)
    target = plan_target(cap.plan.crop, seen["canvas"], s.upscale_factor, s.upscale_width, s.upscale_height,
                         s.upscale_method, s.upscale_place, seen["selection"])  # fmt: skip
    return cap, target


def read_checked(capture: Capture) -> Capture:
    """Read the region's pixels (on any thread); a fully transparent region is refused
    (:class:`NothingToRefine`: nothing to upscale)."""
    capture.read()
    if not any_visible(capture.fmt, capture.pixels, None):
        raise NothingToRefine(
            f"Nothing to upscale: {capture.target.description} is fully transparent there. Nothing was sent."
        )
    return capture


def place(adapter: Adapter, job: Job, data: Any) -> Placed | str:
    """Put an upscale's result where it goes: the Placed layer ("scale"), or the new document's name.
    Raises ``NotApplied`` (then nothing changed) or the adapter's errors."""
    target = job.params.upscale
    assert target is not None
    if target.place == "scale":
        adapter.scale_document(job.target, target.canvas, target.scaled_canvas)
        return adapter.apply(job.target, target.box, job.fmt, data, job.layer_name)
    return adapter.open_as_document(job.layer_name, target.box, job.fmt, job.profile, data)


def described(target: UpscaleTarget) -> str:
    """``2x (1024x768)`` for messages."""
    size = f"{target.width}x{target.height}"
    return size if target.label == size else f"{target.label} ({size})"
