"""Raw pixel frames: the image description that travels in a header, and its byte length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import BAD_FIELD, MISSING_FIELD, ProtocolError, clip, shown

ORDERS = ("RGBA", "BGRA", "RGB", "BGR", "L")  # "L": one channel (masks)
DEPTHS = (8, 16, 32)  # bits per channel, little-endian
SAMPLES = ("uint", "float")  # unsigned integer (8 or 16 bit) or IEEE float (16 = half, 32 = single)
FORMATS = (("uint", 8), ("uint", 16), ("float", 16), ("float", 32))
MAX_SIDE = 16384  # hard protocol limit; a service may set a lower pixel limit


@dataclass(frozen=True)
class ImageSpec:
    """How the bytes of one pixel frame are laid out: tightly packed rows, top row first."""

    width: int
    height: int
    order: str = "RGBA"
    depth: int = 8
    sample: str = "uint"

    @property
    def channels(self) -> int:
        return len(self.order)

    @property
    def bytes_per_pixel(self) -> int:
        return self.channels * self.depth // 8

    @property
    def byte_length(self) -> int:
        return self.width * self.height * self.bytes_per_pixel

    @property
    def has_alpha(self) -> bool:
        return "A" in self.order

    def to_wire(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "order": self.order,
            "depth": self.depth,
            "sample": self.sample,
        }

    @classmethod
    def from_wire(cls, value: Any, field: str) -> ImageSpec:
        """Validate a header's image description; errors name ``field.key``."""
        check_size_map(value, field, {"width", "height", "order", "depth", "sample"}, "width, height, order, depth")
        order = value.get("order", "RGBA")
        if order not in ORDERS:
            raise ProtocolError(
                BAD_FIELD, f"{field}.order must be one of {', '.join(ORDERS)}, got {order!r}", f"{field}.order"
            )
        depth = value.get("depth", 8)
        if type(depth) is not int or depth not in DEPTHS:
            raise ProtocolError(BAD_FIELD, f"{field}.depth must be 8, 16 or 32, got {depth!r}", f"{field}.depth")
        sample = value.get("sample", "uint")
        if sample not in SAMPLES:
            raise ProtocolError(BAD_FIELD, f"{field}.sample must be uint or float, got {sample!r}", f"{field}.sample")
        if (sample, depth) not in FORMATS:
            raise ProtocolError(
                BAD_FIELD,
                f"{field}: {depth}-bit {sample} samples are not supported; use uint 8/16 or float 16/32",
                f"{field}.depth",
            )
        return cls(value["width"], value["height"], order, depth, sample)


@dataclass(frozen=True)
class Image:
    """An image spec with its pixel bytes (any buffer: bytes, memoryview, a zmq frame)."""

    spec: ImageSpec
    data: Any

    def __post_init__(self) -> None:
        n = memoryview(self.data).nbytes
        if n != self.spec.byte_length:
            raise ValueError(f"pixel buffer holds {n} bytes, spec {self.spec} needs {self.spec.byte_length}")


def check_size_map(value: Any, field: str, allowed: set[str], what: str) -> None:
    """A header map with ``width`` and ``height`` (integers from 1 to ``MAX_SIDE``) and no key beyond
    ``allowed`` (an image's description, an upscale's size); errors name ``field.key``."""
    if not isinstance(value, dict):
        raise ProtocolError(BAD_FIELD, f"{field} must be a map with {what}", field)
    unknown = set(value) - allowed
    if unknown:
        name = sorted(map(str, unknown))[0]
        raise ProtocolError(BAD_FIELD, f"unknown field {field}.{clip(name, 60)}", f"{field}.{name}")
    for key in ("width", "height"):
        if key not in value:
            raise ProtocolError(MISSING_FIELD, f"{field}.{key} is required", f"{field}.{key}")
        v = value[key]
        if type(v) is not int or not 1 <= v <= MAX_SIDE:
            raise ProtocolError(
                BAD_FIELD, f"{field}.{key} must be an integer from 1 to {MAX_SIDE}, got {shown(v)}", f"{field}.{key}"
            )
