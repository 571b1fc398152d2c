"""Float documents with values above 1.0: the model refines a tone-mapped picture, the range comes back.

The model takes and gives pixels in [0, 1]. A float document (16- or 32-bit float in Krita) may hold
brighter values (a lamp at 2.5); clipping them to 1 would flatten every highlight of the selection.
When a picture has values above 1, :func:`tone_map` compresses its range into [0, 1] with a curve
on each pixel's brightest channel and :meth:`ToneMap.restore` undoes it on the model's result:

- Below the knee (``KNEE`` = 0.8) the curve is the identity: shadows and mid-tones reach the model
  as they are, as in an 8-bit document.
- From the knee to the picture's peak ``P`` it is a straight line to 1.0 (``P`` maps to exactly
  1.0). A straight line compresses all highlights equally, by ``(P - KNEE) / (1 - KNEE)``, which
  is the smallest amplification of the model's error that any curve with an identity toe can have
  at the top: a pixel at 2.5 that the model returns off by ``d`` comes back off by 8.5 ``d``.
- The curve scales R, G and B of a pixel by the same factor (its brightest channel's), so hue and
  saturation are kept.

The curve is decided by the selected pixels (the job's mask), not by the context around them: a
selection with no value above 1 is not tone-mapped at all (``tone_map`` returns it and None), so it
runs exactly as in an SDR document, however bright the context; the context is then clipped to 1 for the
model, and comes back as it was. A selection with brighter pixels maps its own peak to 1.0 (brighter
context is clipped for the model). Negative values and NaN are not part of this: the model gets them
as 0 (the source pixels outside a mask are kept as they were).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KNEE = 0.8  # the curve is the identity below this value
HDR_MAX = 65504.0  # the largest finite half float (Krita's 16-bit float documents); +inf becomes this


def sanitize(values: np.ndarray, copy: bool = True) -> np.ndarray:
    """Finite float32 values: NaN becomes 0, +-inf +-HDR_MAX (negatives are kept); ``copy=False``
    works in place on a float32 array."""
    values = np.asarray(values, np.float32)
    return np.nan_to_num(values, copy=copy, nan=0.0, posinf=HDR_MAX, neginf=-HDR_MAX)


@dataclass(frozen=True)
class ToneMap:
    """The curve of one picture: identity up to ``knee``, then linear from (knee, knee) to (peak, 1)."""

    peak: float
    knee: float = KNEE

    def __post_init__(self) -> None:
        if not self.peak > 1.0 or not 0.0 < self.knee < 1.0:
            raise ValueError(f"a tone map needs a peak above 1 and a knee in (0, 1), got {self.peak}, {self.knee}")

    @property
    def gain(self) -> float:
        """How much the curve compresses the highlights (the slope of its inverse above the knee)."""
        return (self.peak - self.knee) / (1.0 - self.knee)

    def _scaled(self, rgb: np.ndarray, forward: bool) -> np.ndarray:
        """``rgb`` with every pixel whose brightest channel ``m`` is above the knee scaled by
        ``curve(m) / m`` (forward) or ``inverse(m) / m``; the others as they are (a new array)."""
        out = np.array(rgb, dtype=np.float32)
        m = np.maximum(np.maximum(out[..., 0], out[..., 1]), out[..., 2])
        k = np.float32(self.knee)
        gain = np.float32(self.gain if not forward else 1.0 / self.gain)
        target = (m - k) * gain
        target += k
        scale = np.ones_like(m)
        np.divide(target, m, out=scale, where=m > k)
        out *= scale[..., None]
        return out

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 values in [0, peak] -> [0, 1]."""
        out = self._scaled(rgb, forward=True)
        return np.clip(out, 0.0, 1.0, out=out)

    def restore(self, rgb: np.ndarray) -> np.ndarray:
        """The model's HxWx3 result in [0, 1] -> the document's range [0, peak]."""
        return self._scaled(np.clip(rgb, 0.0, 1.0), forward=False)


def tone_map(rgb: np.ndarray, selected: np.ndarray | None = None) -> tuple[np.ndarray, ToneMap | None]:
    """(the picture for the model in [0, 1], the curve to undo or None when nothing selected exceeds 1).
    ``rgb``: HxWx3 float, negatives and NaN allowed (they become 0). ``selected``: HxW bool, the pixels the
    job refines (its selection); the curve is decided by them alone, so a selection with no value above 1
    is refined exactly as an SDR one however bright the context around it (the context is then clipped to
    1 for the model: it is only context, and comes back as it was)."""
    values = sanitize(np.clip(rgb, 0.0, HDR_MAX, dtype=np.float32), copy=False)
    peak = float((values if selected is None else values[selected]).max(initial=0.0))
    if peak <= 1.0:
        return np.clip(values, 0.0, 1.0, out=values), None
    curve = ToneMap(peak)
    return curve.apply(values), curve
