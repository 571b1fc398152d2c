"""Size and count limits of the service: checked on every submit before any work starts."""

from __future__ import annotations

from dataclasses import dataclass

from krita_sdxl.protocol import Message, ProtocolError
from krita_sdxl.protocol import errors as codes
from krita_sdxl.protocol.codec import MAX_HEADER_BYTES

_MAX_BYTES_PER_PIXEL = 16  # RGBA float32


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 8192 * 8192  # per image (and per work size)
    max_prompt_chars: int = 4000
    max_jobs_per_client: int = 32  # queued + running
    max_jobs_total: int = 1000

    @property
    def max_frame_bytes(self) -> int:
        """ZMQ_MAXMSGSIZE: a frame larger than any valid one makes ZeroMQ drop the peer outright."""
        return max(self.max_pixels * _MAX_BYTES_PER_PIXEL, MAX_HEADER_BYTES) + 1024

    def check_submit(self, msg: Message, client_jobs: int, total_jobs: int) -> None:
        job = msg.job
        for name in ("image", "mask"):
            spec = msg.fields.get(name)
            if spec is not None and spec.width * spec.height > self.max_pixels:
                raise ProtocolError(
                    codes.LIMIT,
                    f"{name} is {spec.width}x{spec.height} = {spec.width * spec.height} "
                    f"pixels; this service accepts at most {self.max_pixels}",
                    name,
                    job,
                )
        ww, wh = msg.fields.get("work_width"), msg.fields.get("work_height")
        if ww is not None and wh is not None and ww * wh > self.max_pixels:
            raise ProtocolError(codes.LIMIT, f"work size {ww}x{wh} exceeds {self.max_pixels} pixels", "work_width", job)
        for name in ("prompt", "negative_prompt"):
            text = msg.fields.get(name) or ""
            if len(text) > self.max_prompt_chars:
                raise ProtocolError(
                    codes.LIMIT,
                    f"{name} is {len(text)} characters long; the limit is {self.max_prompt_chars}",
                    name,
                    job,
                )
        if client_jobs >= self.max_jobs_per_client:
            raise ProtocolError(
                codes.LIMIT,
                f"this client already has {client_jobs} jobs queued or running; "
                f"the limit is {self.max_jobs_per_client}",
                None,
                job,
            )
        if total_jobs >= self.max_jobs_total:
            raise ProtocolError(
                codes.LIMIT,
                f"the service already has {total_jobs} jobs queued or running; the limit is {self.max_jobs_total}",
                None,
                job,
            )
