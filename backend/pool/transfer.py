"""Pixels through Ray's object store: one copy in, one copy out, zero-copy reads.

In: ``ship`` puts the image (and mask) ZeroMQ frame into the object store once, as a uint8 view of the
frame (``ray.put``: the one copy), and sends the request without its pixels. The replica's ``land``
reads them back as read-only views of the object store: no copy on the same host, one transfer
to another host. A rerun on another replica (backend/pool/dispatcher.py) reuses the same objects.

Out: the replica yields the result as a uint8 array (Ray stores it out of band: one copy into the
object store); the dispatcher wraps a read-only view of it in an Image that ZeroMQ sends zero-copy.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.protocol import Image, ImageSpec

Packed = tuple[dict[str, Any], np.ndarray]  # (the image's spec on the wire, its bytes as uint8)


def as_array(image: Image) -> np.ndarray:
    """The image's bytes as a flat uint8 array, without a copy."""
    return np.frombuffer(memoryview(image.data).cast("B"), dtype=np.uint8)


def pack(image: Image) -> Packed:
    return image.spec.to_wire(), as_array(image)


def unpack(packed: Packed) -> Image:
    spec, data = packed
    return Image(ImageSpec(**spec), data)


def in_store(array: np.ndarray) -> bool:
    """True for a read-only view of another buffer: how Ray hands out an object it did not copy."""
    return not array.flags.writeable and not array.flags.owndata


def ship(req: RefineRequest) -> dict[str, Any]:
    """The request for a replica: its pixels put into the object store once, the rest as is."""
    import ray

    def put(image: Image | None) -> tuple[dict[str, Any], Any] | None:
        return None if image is None else (image.spec.to_wire(), ray.put(as_array(image)))

    return {"request": replace(req, image=None, mask=None), "image": put(req.image), "mask": put(req.mask)}


def land(shipped: dict[str, Any]) -> tuple[RefineRequest, bool]:
    """Replica side: the request with its pixels read from the object store, and whether they were
    read without a copy."""
    import ray

    slots = [s for s in (shipped["image"], shipped["mask"]) if s is not None]
    arrays = ray.get([ref for _, ref in slots])
    images = [Image(ImageSpec(**spec), array) for (spec, _), array in zip(slots, arrays, strict=True)]
    req = replace(shipped["request"], image=images[0], mask=images[1] if len(images) > 1 else None)
    return req, all(in_store(a) for a in arrays)
