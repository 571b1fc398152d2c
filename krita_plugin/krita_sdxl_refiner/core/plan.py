"""What to send for one refine: crop, work size and feather, from the document's geometry. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from krita_sdxl.protocol.geometry import Box, Extent, crop_for_selection, feather_radius, work_size

MODE_LABELS = {"refine": "Refine", "generate": "Generate", "two_stage": "Two-stage", "upscale": "Upscale"}
PROMPT_CHARS_IN_NAME = 30


class NothingToRefine(Exception):
    """The source has no pixels where the refine would happen; the message is for the artist."""


@dataclass(frozen=True)
class RefinePlan:
    crop: Box  # document pixels sent (and replaced by the result layer)
    work: Extent  # the size the model runs at; the service scales to it and back
    feather: float  # inward feather of the selection edge, in document pixels
    masked: bool  # the selection's mask over ``crop`` is sent


def plan_refine(
    canvas: Extent,
    source_bounds: Box,
    selection: Box | None,
    strength: float,
    padding_fraction: float,
    feather_fraction: float,
    native_large: bool = False,
    from_noise: bool = False,
) -> RefinePlan:
    """With a selection: its padded crop, at about one megapixel (small areas scaled up), feathered.
    Without: the source's bounds on the canvas, at native size up to one megapixel, not masked; larger
    layers are scaled down to about one megapixel, or, when the backend refines large images in tiles
    (``native_large``), sent at native size so a 4K painting is refined without downscaling. A job
    that paints from noise (``from_noise``) on an empty layer without a selection paints the canvas."""
    if selection is not None:
        if selection.clamp(canvas).is_empty:
            raise NothingToRefine("The selection lies outside the image.")
        inside = selection.clamp(canvas)
        crop = crop_for_selection(inside, canvas, padding_fraction=padding_fraction)
        feather = feather_radius(inside, strength, feather_fraction)
        return RefinePlan(crop, work_size(crop.extent, upscale=True), feather, True)
    area = source_bounds.clamp(canvas)
    if area.is_empty and from_noise:
        area = Box.from_extent(canvas)
    if area.is_empty:
        raise NothingToRefine("The layer is empty inside the image: there is nothing to refine.")
    work = area.extent if native_large else work_size(area.extent, upscale=False)
    return RefinePlan(area, work, 0.0, False)


def nothing_visible(source: str, description: str, masked: bool) -> str:
    """The message for a refine whose source is fully transparent where it would refine."""
    where = " in the selection" if masked else ""
    if source == "layer":
        hint = "Choose Source: Image to refine what you see, paint on the layer first"
    else:
        hint = "Select an area with something in it"
    return (
        f"Nothing to refine: {description} is fully transparent{where}. {hint}, or Generate at strength 1 "
        "to paint from scratch. Nothing was sent."
    )


def short_prompt(prompt: str, limit: int = PROMPT_CHARS_IN_NAME) -> str:
    text = " ".join(prompt.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def layer_name(number: int, mode: str, prompt: str, seed: int | None) -> str:
    """``#3 · seed 1234 · a castle at dawn``: what tells results apart comes first, as the Layers docker cuts
    names at its right edge. The mode is named when it is not Refine (``#4 · seed 9 · Generate · a cat``),
    and alone when there is no prompt (``#5 · seed 7 · Refine``)."""
    parts = [f"#{number}"] if number > 0 else []
    if seed is not None:
        parts.append(f"seed {seed}")
    label = MODE_LABELS.get(mode, mode.capitalize() or "Refine")
    text = short_prompt(prompt)
    if mode != "refine" or not text:
        parts.append(label)
    if text:
        parts.append(text)
    return " · ".join(parts)
