"""A job's pixels between the service and its replica: shared memory on the same host, Ray's object store
to another host.

In: ``ship`` copies the image (and mask) ZeroMQ frame once, into the dispatcher slot's ``in`` file in
/dev/shm (backend/pool/shm.py), and sends the request without its pixels, naming the file. When the pool
has replicas that cannot open the slot's files (another host), it also puts the pixels into the object
store once (``ray.put``). The replica's ``land`` reads read-only views of whichever it can reach: no copy
from shared memory, no copy from the object store on the same host, one transfer to another host; a
replica that can reach neither raises :class:`NeedStore` and the dispatcher ships the job again through
the object store.

Out: the replica copies the result once into the slot's ``out`` file and names it in its ``result`` event
(``deliver``), or, when it cannot (another host, a result larger than the file), yields the array, which
Ray stores out of band. The dispatcher's ``receive`` copies it into the bytes ZeroMQ sends.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.protocol import Image, ImageSpec

from .bounded import bounded
from .shm import Mappings, SlotBuffers

Packed = tuple[dict[str, Any], Any]  # (the image's spec on the wire, its bytes: a uint8 array or ("shm", name, n))
PUT_TIMEOUT_S = 60.0  # a full object store makes ray.put wait for space
ALIGN = 64


class NeedStore(Exception):
    """The replica cannot open the slot's shared memory and was given no object-store copy."""


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


def _put(array: np.ndarray) -> Any:
    import ray

    return bounded("ray.put of a job's pixels", PUT_TIMEOUT_S, ray.put, array)


def ship(req: RefineRequest, buffers: SlotBuffers | None, via_store: bool) -> dict[str, Any]:
    """The request for a replica, its pixels in the slot's shared memory (``buffers``; None: none on this
    host) and, with ``via_store``, in the object store too."""
    images = [img for img in (req.image, req.mask) if img is not None]
    offsets, total = [], 0
    for img in images:
        offsets.append(total)
        total += -(-img.spec.byte_length // ALIGN) * ALIGN
    segment = buffers.for_input(total) if buffers is not None else None
    slots: list[dict[str, Any]] = []
    for img, offset in zip(images, offsets, strict=True):
        array = as_array(img)
        where: dict[str, Any] = {"shm": None, "ref": None}
        if segment is not None:
            segment.write(offset, array.data)
            where["shm"] = (segment.path.name, offset, array.nbytes)
        if via_store or segment is None:
            where["ref"] = _put(array)
        slots.append({"spec": img.spec.to_wire(), **where})
    out = None
    if buffers is not None:
        result = buffers.for_output(req.result_spec.byte_length)
        out = (result.path.name, result.size)
    return {
        "request": replace(req, image=None, mask=None),
        "image": slots[0],
        "mask": slots[1] if len(slots) > 1 else None,
        "out": out,
    }


def add_store(shipped: dict[str, Any], req: RefineRequest) -> dict[str, Any]:
    """``shipped`` with the pixels in the object store as well (for a replica that cannot open the shm)."""
    images = [img for img in (req.image, req.mask) if img is not None]
    slots = [dict(s, ref=s["ref"] or _put(as_array(img))) for s, img in zip(
        [shipped["image"], shipped["mask"]], images, strict=False)]  # fmt: skip
    return {**shipped, "image": slots[0], "mask": slots[1] if len(slots) > 1 else None}


def land(shipped: dict[str, Any], mappings: Mappings) -> tuple[RefineRequest, str]:
    """Replica side: the request with its pixels as read-only views, and where they came from ("shm" or
    "store"); :class:`NeedStore` when neither can be reached."""
    slots = [s for s in (shipped["image"], shipped["mask"]) if s is not None]
    images: list[Image] = []
    how = "shm"
    for slot in slots:
        data: Any = None
        if slot["shm"] is not None:
            name, offset, nbytes = slot["shm"]
            try:
                data = mappings.get(name, offset + nbytes).view(offset, nbytes).toreadonly()
            except OSError:
                data = None
        if data is None:
            if slot["ref"] is None:
                raise NeedStore("the service's shared memory is not reachable from this replica")
            import ray

            data = ray.get(slot["ref"])
            how = "store"
        images.append(Image(ImageSpec(**slot["spec"]), data))
    req = replace(shipped["request"], image=images[0], mask=images[1] if len(images) > 1 else None)
    return req, how


def deliver(image: Image, shipped: dict[str, Any], mappings: Mappings) -> Packed:
    """Replica side: the result into the slot's ``out`` file when it can (else as an array for the object
    store)."""
    array = as_array(image)
    out = shipped.get("out")
    if out is not None and array.nbytes <= out[1]:
        try:
            mappings.get(out[0], array.nbytes).write(0, array.data)
            return image.spec.to_wire(), ("shm", out[0], array.nbytes)
        except OSError:
            pass
    return image.spec.to_wire(), array


def receive(packed: Packed, buffers: SlotBuffers | None) -> Image:
    """Service side: the result as an Image the service owns (copied out of the slot's ``out`` file, which
    the next job reuses)."""
    spec, data = packed
    if isinstance(data, tuple) and data[0] == "shm":
        _, name, nbytes = data
        if buffers is None or buffers.output is None or buffers.output.path.name != name:
            raise RuntimeError(f"the replica wrote its result to {name}, which is not this slot's file")
        return Image(ImageSpec(**spec), bytes(buffers.output.view(0, nbytes)))
    return Image(ImageSpec(**spec), data)
