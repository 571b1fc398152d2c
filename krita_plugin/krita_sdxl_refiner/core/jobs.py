"""Job records and their state machine. Pure Python.

A job goes reading (a large layer's pixels are copied off the UI thread) -> waiting (captured, not
sent yet: no backend) -> sent (its pixels going up: ``credit`` events count them) -> queued (``accepted``) ->
running (first ``progress``) -> done / failed / cancelled, or lost (the backend went away with it:
it keeps its pixels and can be resubmitted). A job keeps the pixels it was captured with until it
ends; a done job hands them to the results history (:mod:`history`) for "Again with a new seed".

Every job carries its seed from the start: a "Random" seed is drawn here, when the job is made, so a
resubmitted job runs exactly as it was captured, and a layer's name says its seed before it is sent.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from krita_sdxl.protocol import Image

from .pixelformat import PixelFormat
from .plan import RefinePlan, layer_name
from .upscale import UpscaleTarget

RANDOM_SEEDS = 2**32  # a random seed is drawn below this, as the service draws its own


def new_seed() -> int:
    """A random seed for a job whose settings say "Random"."""
    return random.SystemRandom().randrange(RANDOM_SEEDS)


UPLOAD_SHOWN_BYTES = 4 * 1024 * 1024  # smaller uploads are over before a progress bar could mean anything


class JobState(str, Enum):
    reading = "reading"  # its pixels are being read from the document, off the UI thread
    waiting = "waiting"  # captured; sent as soon as the backend is connected
    sent = "sent"
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"
    lost = "lost"  # the backend went away while it had the job; it can be resubmitted as it was

    @property
    def finished(self) -> bool:
        return self in (JobState.done, JobState.failed, JobState.cancelled, JobState.lost)


@dataclass(frozen=True)
class JobParams:
    mode: str
    prompt: str
    negative_prompt: str
    strength: float
    steps: int
    guidance: float
    seed: int | None  # drawn when the job is made (new_seed) for a "Random" seed; None only for old records
    preview: bool
    denoising_end: float = 0.8  # generate mode: where the base hands over to the refiner
    keep_unmasked: bool = True  # with a mask: hold the unselected area to the source
    upscale: UpscaleTarget | None = None  # an upscale: the result's size and where it goes (core/upscale.py)


@dataclass(frozen=True)
class Target:
    """Where the result goes. ``document`` and the node ids are opaque to this module (the Krita
    adapter's handles); ``source`` is "layer" (above node ``node_id``) or "canvas" (top of the stack).
    ``above``: the result layers made earlier from the same source, newest first; set when a result is
    applied (``History.layers_of_source``): the new layer goes directly above the topmost of them that
    still exists, so results stack newest on top instead of hiding under older ones."""

    document: Any
    node_id: Any
    source: str
    description: str  # "Paint Layer 1 in castle.kra", for messages
    above: tuple[Any, ...] = ()


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Job:
    id: str
    params: JobParams
    plan: RefinePlan
    fmt: PixelFormat
    target: Target
    transfer: str = "srgb"  # "srgb" or "linear": the document profile's transfer curve
    profile: str = ""  # the document's colour profile name
    images: dict[str, Image] = field(default_factory=dict)  # pixels until the job ends (kept for resubmission)
    state: JobState = JobState.waiting
    seed: int | None = None
    steps: int | None = None  # scheduler steps as the service plans them
    step: int = 0
    total: int = 0
    position: int | None = None
    uploaded: int = 0  # bytes of its pixels the service holds (its credit events), while they go up
    upload_total: int = 0
    message: str = ""
    elapsed: float | None = None
    number: int = 0  # "#3" in its layer's name: counts this session's jobs (JobList.add); a resubmission keeps it
    capture_id: str = field(default_factory=new_job_id)  # shared by resubmissions and "Again" of one capture
    created: float = field(default_factory=time.monotonic)
    touched: float = field(default_factory=time.monotonic)  # last event (or send) for this job

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = self.params.seed

    @property
    def layer_name(self) -> str:
        return layer_name(self.number, self.params.mode, self.params.prompt, self.seed)

    def submit_fields(self) -> dict[str, Any]:
        """The fields of this job's ``submit`` message (without images)."""
        p = self.params
        return {
            "job": self.id,
            "mode": p.mode,
            "prompt": p.prompt,
            "negative_prompt": p.negative_prompt,
            "strength": p.strength,
            "steps": p.steps,
            "guidance_scale": p.guidance,
            "seed": p.seed,
            "preview": p.preview,
            "work_width": self.plan.work.width,
            "work_height": self.plan.work.height,
            "feather": float(self.plan.feather),
            "transfer": self.transfer,
            "denoising_end": p.denoising_end,
            "keep_unmasked": p.keep_unmasked,
            **(self._upscale_fields() if p.upscale is not None else {}),
        }

    def _upscale_fields(self) -> dict[str, Any]:
        """An upscale is a refine of the whole region at the result's size: no work size, no feather."""
        assert self.params.upscale is not None
        return {"mode": "refine", "upscale": self.params.upscale.wire(), "work_width": None, "work_height": None,
                "feather": 0.0}  # fmt: skip

    @property
    def result_size(self) -> tuple[int, int]:
        """The size the result comes back at: the crop's, or an upscale's."""
        up = self.params.upscale
        return (up.width, up.height) if up is not None else (self.plan.crop.width, self.plan.crop.height)

    def on_event(self, msg_type: str, fields: dict[str, Any]) -> bool:
        """Apply one service event for this job. Returns True when the state changed meaningfully."""
        if self.state.finished:
            return False
        if msg_type == "credit":  # the upload's progress
            received = int(fields.get("received") or 0)
            changed = received != self.uploaded
            self.uploaded = received
            return changed
        if msg_type == "accepted":
            self.state = JobState.queued if self.state in (JobState.waiting, JobState.sent) else self.state
            self.position = fields.get("position")
            self.seed = fields.get("seed", self.seed)
            self.steps = fields.get("steps")
            self.total = fields.get("denoise_steps") or self.total
            return True
        if msg_type == "progress":
            self.state = JobState.running
            self.step = fields.get("step", self.step)
            self.total = fields.get("total", self.total)
            return True
        if msg_type == "result":  # the pixels stay: the controller hands them to the history
            self.state = JobState.done
            self.seed = fields.get("seed", self.seed)
            self.elapsed = fields.get("elapsed")
            self.step = self.total
            return True
        if msg_type == "error":
            self.state = JobState.failed
            self.message = str(fields.get("message") or fields.get("code") or "failed")
            self.images.clear()
            return True
        if msg_type == "cancelled" and fields.get("reason") == "shutdown":
            self.lose("the backend stopped before it finished")  # not the artist's doing: resubmittable
            return True
        if msg_type == "cancelled":
            self.state = JobState.cancelled
            self.message = str(fields.get("reason") or "cancelled")
            self.images.clear()
            return True
        return False

    def mark_sent(self) -> None:
        self.state = JobState.sent
        self.touched = time.monotonic()
        self.uploaded = 0
        self.upload_total = sum(image.spec.byte_length for image in self.images.values())

    @property
    def upload_percent(self) -> int | None:
        """How much of its pixels the service holds, while they go up and take long enough to show
        (``UPLOAD_SHOWN_BYTES`` or more); None otherwise."""
        if self.state is not JobState.sent or self.upload_total < UPLOAD_SHOWN_BYTES:
            return None
        return min(100, self.uploaded * 100 // self.upload_total)

    def lose(self, message: str) -> None:
        """The backend no longer has this job (restarted or replaced): keep everything for a resubmit."""
        self.state = JobState.lost
        self.message = message

    def resubmission(self) -> Job:
        """A fresh job with the same settings, seed, pixels, plan, target and number (a new id: the old one
        is gone)."""
        params = self.params if self.params.seed is not None else replace(self.params, seed=self.seed)
        job = self.rerun(params, self.target)
        job.number = self.number
        return job

    def rerun(self, params: JobParams, target: Target) -> Job:
        """A fresh job from the same captured pixels and plan (same capture), with these settings."""
        return Job(
            new_job_id(),
            params,
            self.plan,
            self.fmt,
            target,
            transfer=self.transfer,
            profile=self.profile,
            images=dict(self.images),
            capture_id=self.capture_id,
        )

    def again(self) -> Job:
        """The same capture once more with a new random seed (and a new number)."""
        return self.rerun(replace(self.params, seed=new_seed()), self.target)

    def fail(self, message: str) -> None:
        self.state = JobState.failed
        self.message = message
        self.images.clear()

    def cancel_locally(self, reason: str = "before it was sent") -> None:
        self.state = JobState.cancelled
        self.message = reason
        self.images.clear()

    @property
    def status_text(self) -> str:
        s = self.state
        if s is JobState.reading:
            return "Reading the pixels…"
        if s is JobState.waiting:
            return "Waiting for the backend…"
        if s is JobState.sent:
            percent = self.upload_percent
            if percent is None:
                return "Sent…"
            return f"Uploading {percent}% of {self.upload_total / 2**20:.0f} MiB…"
        if s is JobState.queued:
            return "Queued" + (f" (position {self.position})" if self.position else "") + "…"
        if s is JobState.running:
            return f"Step {self.step}/{self.total}"
        if s is JobState.done:
            took = f" in {self.elapsed:.1f} s" if self.elapsed is not None else ""
            return f"Done{took}, seed {self.seed}"
        if s is JobState.failed:
            return f"Failed: {self.message}"
        if s is JobState.lost:
            return f"Lost: {self.message}. Resubmit to run it again."
        return "Cancelled" + (f": {self.message}" if self.message not in ("", "cancelled") else "")


class JobList:
    """Jobs of this Krita session by id, oldest first. Finished jobs beyond ``keep`` are forgotten."""

    def __init__(self, keep: int = 20) -> None:
        self._jobs: dict[str, Job] = {}
        self._keep = keep
        self._count = 0  # jobs numbered so far

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> Job:
        """Keep ``job``; one without a number gets the next one."""
        if job.number <= 0:
            self._count += 1
            job.number = self._count
        self._jobs[job.id] = job
        finished = [j for j in self._jobs.values() if j.state.finished]
        for old in finished[: max(0, len(finished) - self._keep)]:
            del self._jobs[old.id]
        return job

    def get(self, job_id: str | None) -> Job | None:
        return self._jobs.get(job_id) if job_id else None

    def remove(self, job_id: str) -> Job | None:
        """Forget a job that never became one (its capture was refused)."""
        return self._jobs.pop(job_id, None)

    def unfinished(self) -> list[Job]:
        return [j for j in self._jobs.values() if not j.state.finished]

    def waiting(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.state is JobState.waiting]

    def lost(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.state is JobState.lost]

    def in_service(self) -> list[Job]:
        """Jobs the service has (or should have): sent, queued or running."""
        return [j for j in self._jobs.values() if j.state in (JobState.sent, JobState.queued, JobState.running)]

    def current(self) -> Job | None:
        """The job to show: the running one, else the oldest unfinished, else the newest."""
        jobs = list(self._jobs.values())
        for j in jobs:
            if j.state is JobState.running:
                return j
        unfinished = self.unfinished()
        if unfinished:
            return unfinished[0]
        return jobs[-1] if jobs else None


def status_job_ids(fields: dict[str, Any]) -> set[str]:
    """Every string inside a ``status`` event's fields: the job ids it mentions, whatever the layout
    of its ``jobs`` list (ids, or maps with an id)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(fields)
    return found
