"""Size, count and byte limits of the service: the numbers, and the per-message checks of a submit.

The job counts and byte budgets themselves are enforced by the queue (backend/service/jobs.py), which
knows what every client holds; :meth:`Limits.queue_budgets` hands it these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from krita_sdxl.protocol import WINDOW_BYTES, Message, ProtocolError
from krita_sdxl.protocol import errors as codes
from krita_sdxl.protocol.codec import MAX_FRAME_BYTES
from krita_sdxl.protocol.schema import MAX_PROMPT_CHARS
from krita_sdxl.protocol.upscale import limit_problem

_MAX_BYTES_PER_PIXEL = 16  # RGBA float32
GiB = 1024**3


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 8192 * 8192  # per image (and per work size)
    max_prompt_chars: int = MAX_PROMPT_CHARS  # the protocol's limit; a service may set a lower one
    max_jobs_per_client: int = 32  # queued + running (+ uploading)
    max_jobs_total: int = 1000  # a client with no job may still queue one beyond it (see JobQueue)
    max_connections: int = 1000  # open connections (backend/service/connections.py)
    hello_grace: float = 5.0  # seconds a new connection has to send its first message
    result_ttl: float = 600.0  # seconds an undelivered result is kept, then dropped with an error to its owner
    upload_timeout: float = 30.0  # seconds an upload may go without a chunk before it is dropped
    # Unread input one TCP connection may make the service hold (backend/service/intake.py): a credit
    # window of chunks, and room for the small messages around them.
    intake_budget: int = WINDOW_BYTES + 4 * 1024 * 1024
    # Bytes of queued images (image + mask frames) and undelivered results. None: derived from
    # max_pixels (a client can always queue the largest valid submit; see the properties below).
    max_client_bytes: int | None = None
    max_total_bytes: int | None = None

    @property
    def max_frame_bytes(self) -> int:
        """ZMQ_MAXMSGSIZE: a frame larger than any valid one (a 1 MiB chunk) makes ZeroMQ drop the peer."""
        return MAX_FRAME_BYTES

    @property
    def max_submit_bytes(self) -> int:
        """Pixel bytes of the largest valid submit: an RGBA float32 image and an 8-bit mask."""
        return self.max_pixels * (_MAX_BYTES_PER_PIXEL + 1)

    @property
    def client_bytes(self) -> int:
        """Per client: the largest valid submit, and at least 1 GiB (many ordinary jobs)."""
        return self.max_client_bytes if self.max_client_bytes is not None else max(self.max_submit_bytes, GiB)

    @property
    def total_bytes(self) -> int:
        """All clients together: four clients' worth (a fifth client still gets in: the queue then
        drops the biggest holder's newest queued job)."""
        return self.max_total_bytes if self.max_total_bytes is not None else 4 * self.client_bytes

    def describe(self) -> dict[str, int]:
        """``welcome.capabilities.limits``: what a client can check before it sends a job."""
        return {
            "max_pixels": self.max_pixels,
            "max_prompt_chars": self.max_prompt_chars,
            "max_jobs_per_client": self.max_jobs_per_client,
            "max_jobs_total": self.max_jobs_total,
        }

    def queue_budgets(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~krita_sdxl.backend.service.jobs.JobQueue`."""
        return {
            "max_total": self.max_jobs_total,
            "first_job_extra": self.max_connections,
            "max_per_client": self.max_jobs_per_client,
            "max_client_bytes": self.client_bytes,
            "max_total_bytes": self.total_bytes,
        }

    def check_submit(self, msg: Message) -> None:
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
        self._check_upscale(msg)
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

    def _check_upscale(self, msg: Message) -> None:
        """An upscale's result counts against ``max_pixels``; the message names the largest factor that fits."""
        spec, image = msg.fields.get("upscale"), msg.fields.get("image")
        if spec is None or image is None:
            return
        problem = limit_problem(image.width, image.height, spec.width, spec.height, self.max_pixels)
        if problem is not None:
            raise ProtocolError(codes.LIMIT, problem, "upscale", msg.job)
