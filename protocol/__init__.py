"""krita-sdxl wire protocol: message schema, codec and validation (stdlib + msgpack only).

The specification is ``README.md`` beside this file.
"""

from .codec import CLIENT, MAX_HEADER_BYTES, PROTOCOL_VERSION, SERVICE, Message, decode, encode, error_fields
from .errors import ProtocolError
from .images import DEPTHS, FORMATS, MAX_SIDE, ORDERS, SAMPLES, Image, ImageSpec
from .policy import StepPlan, plan_img2img
from .transfer import MAX_CHUNK_BYTES, WINDOW_BYTES, Incoming, Outgoing

__all__ = [
    "CLIENT",
    "DEPTHS",
    "FORMATS",
    "MAX_CHUNK_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_SIDE",
    "ORDERS",
    "PROTOCOL_VERSION",
    "SAMPLES",
    "SERVICE",
    "WINDOW_BYTES",
    "Image",
    "ImageSpec",
    "Incoming",
    "Message",
    "Outgoing",
    "ProtocolError",
    "StepPlan",
    "decode",
    "encode",
    "error_fields",
    "plan_img2img",
]
