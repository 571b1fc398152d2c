"""The refine workflow: settings, connection, jobs and results, between the docker and Krita.

No Krita import here: the document side goes through an adapter object (``krita_adapter.KritaAdapter``
in Krita, a fake in tests) with ``read_setting``, ``write_setting``, ``capture``, ``apply``,
``apply_to_active`` and ``open_as_document``. No socket here either: that is :class:`Client`.
"""

from __future__ import annotations

import functools
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from PyQt5.QtCore import QObject, QTimer, pyqtSignal

from krita_sdxl.protocol import Image, ImageSpec, Message, ProtocolError
from krita_sdxl.protocol.geometry import Box, Extent

from . import settings as settings_mod
from .backend import Backend
from .buffers import preview_image
from .client import Client, CurveKeys
from .jobs import Job, JobList, JobParams, JobState, ResultList, StoredResult, Target, new_job_id, status_job_ids
from .pixelformat import PixelFormat, UnsupportedFormat
from .plan import NothingToRefine, RefinePlan, plan_refine
from .settings import Settings

STATUS_AFTER_SILENCE = 15.0  # seconds without news of a job in the service before asking for status

F = TypeVar("F", bound=Callable[..., Any])


def guarded(method: F) -> F:
    """For Qt slots: an exception escaping a slot opens Krita's modal error dialog. Report it as a
    notice (and its traceback on stderr) instead."""

    @functools.wraps(method)
    def wrapper(self: Controller, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self.notice.emit(f"Internal error in the SDXL Refiner: {type(exc).__name__}: {exc}", "error")
            return None

    return wrapper  # type: ignore[return-value]


class AdapterError(Exception):
    """The document side cannot do what was asked; the message is for the artist."""


@dataclass
class Capture:
    """What the adapter read from the document for one job."""

    plan: RefinePlan
    fmt: PixelFormat
    profile: str
    transfer: str  # "srgb" or "linear"
    pixels: Any  # buffer, fmt sized over plan.crop
    mask: Any | None  # L8 buffer over plan.crop, or None
    target: Target


class Planner(Protocol):
    def __call__(self, canvas: Extent, source_bounds: Box, selection: Box | None) -> RefinePlan: ...


class Adapter(Protocol):
    def read_setting(self, key: str, default: str) -> str: ...
    def write_setting(self, key: str, value: str) -> None: ...
    def capture(self, source: str, planner: Planner) -> Capture: ...
    def apply(self, target: Target, box: Box, fmt: PixelFormat, data: Any, name: str) -> str | None: ...
    def apply_to_active(self, result: StoredResult) -> None: ...
    def open_as_document(self, result: StoredResult) -> None: ...


class Controller(QObject):
    settings_changed = pyqtSignal(object)  # Settings
    connection_changed = pyqtSignal(str, str)  # state, detail
    capabilities_changed = pyqtSignal(str, dict)  # server, capabilities
    jobs_changed = pyqtSignal()
    preview_ready = pyqtSignal(object)  # QImage
    notice = pyqtSignal(str, str)  # text, level: "info", "warning", "error"
    results_changed = pyqtSignal()
    backend_changed = pyqtSignal(str, str)  # state, detail
    backend_output = pyqtSignal(str)

    def __init__(self, adapter: Adapter, client: Client | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.adapter = adapter
        self.settings = settings_mod.load(adapter.read_setting)
        self.jobs = JobList()
        self.results = ResultList()
        self.last_seed: int | None = None
        self.client = client or Client(self.settings.endpoint, parent=self, curve=self._curve(self.settings))
        self.client.state_changed.connect(self.connection_changed)
        self.client.welcomed.connect(self._on_welcome)
        self.client.received.connect(self._on_message)
        self.client.problem.connect(lambda text: self.notice.emit(text, "warning"))
        self.backend = Backend(self)
        self.backend.state_changed.connect(self.backend_changed)
        self.backend.output.connect(self.backend_output)
        self._status_pending: set[str] | None = None
        self._watch = QTimer(self)
        self._watch.setInterval(5000)
        self._watch.timeout.connect(self._check_silent_jobs)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.client.start()
        self._watch.start()

    def shutdown(self) -> None:
        self._watch.stop()
        self.client.stop()
        self.backend.kill()

    # --- settings ----------------------------------------------------------------------------

    @guarded
    def update_settings(self, **changes: Any) -> None:
        new = self._with_client_keys(self.settings.changed(**changes))
        if new == self.settings:
            return
        old, self.settings = self.settings, new
        settings_mod.save(new, self.adapter.write_setting, previous=old)
        if self._curve(new) != self._curve(old):
            self.client.set_curve(self._curve(new))
        if new.endpoint != old.endpoint:
            self.client.set_endpoint(new.endpoint)
        self.settings_changed.emit(new)

    @staticmethod
    def _curve(s: Settings) -> CurveKeys | None:
        return CurveKeys.from_settings(s.server_public_key, s.client_secret_key)

    def _with_client_keys(self, s: Settings) -> Settings:
        """With a server key but no client key yet, create this computer's key pair (once) and say
        what to do with its public key on the backend machine."""
        if not s.server_public_key.strip() or s.client_secret_key.strip():
            return s
        from PyQt5.QtCore import QStandardPaths

        from .keys import ensure_client_keys, public_key_text

        folder = Path(QStandardPaths.writableLocation(QStandardPaths.AppDataLocation)) / "krita-sdxl-keys"
        secret = ensure_client_keys(folder)
        self.notice.emit(
            "Created this computer's key pair. On the backend machine run: krita-sdxl authorize "
            f"{public_key_text(secret)} --dir AUTHORIZED_KEYS_FOLDER",
            "info",
        )
        return s.changed(client_secret_key=str(secret))

    @property
    def backend_tiles_large_images(self) -> bool:
        """The connected backend refines large images at native size in tiles (capabilities.tiling)."""
        caps = self.client.capabilities or {}
        return bool(caps.get("tiling"))

    @property
    def supported_modes(self) -> list[str]:
        modes = self.client.capabilities.get("modes") if self.client.capabilities else None
        return [m for m in modes if isinstance(m, str)] if isinstance(modes, list) else ["refine"]

    # --- jobs --------------------------------------------------------------------------------

    @guarded
    def refine(self) -> Job | None:
        """Capture the active document and submit (or queue until connected). Never raises."""
        s = self.settings
        if s.mode not in self.supported_modes:
            self.notice.emit(f"The backend does not support the {s.mode!r} mode.", "error")
            return None

        def planner(canvas: Extent, source_bounds: Box, selection: Box | None) -> RefinePlan:
            return plan_refine(
                canvas,
                source_bounds,
                selection,
                s.strength,
                s.padding_fraction,
                s.feather_fraction,
                native_large=self.backend_tiles_large_images,
            )

        try:
            capture = self.adapter.capture(s.source, planner)
        except (UnsupportedFormat, NothingToRefine, AdapterError) as exc:
            self.notice.emit(str(exc), "error")
            return None
        except Exception as exc:  # a Krita surprise must never become a modal error dialog
            self.notice.emit(f"Could not read the document: {type(exc).__name__}: {exc}", "error")
            return None
        job = self._make_job(s, capture)
        self.jobs.add(job)
        if self.client.is_connected:
            self._send(job)
        else:
            self.notice.emit("The backend is not connected; the job starts as soon as it is.", "warning")
        self.jobs_changed.emit()
        return job

    def _make_job(self, s: Settings, capture: Capture) -> Job:
        crop = capture.plan.crop
        images = {"image": Image(capture.fmt.spec(crop.width, crop.height), capture.pixels)}
        if capture.mask is not None:
            images["mask"] = Image(ImageSpec(crop.width, crop.height, "L", 8, "uint"), capture.mask)
        params = JobParams(
            mode=s.mode,
            prompt=s.prompt,
            negative_prompt=s.negative_prompt,
            strength=s.strength,
            steps=s.steps,
            guidance=s.guidance,
            seed=None if s.random_seed else s.seed,
            preview=s.preview,
        )
        return Job(
            new_job_id(),
            params,
            capture.plan,
            capture.fmt,
            capture.target,
            transfer=capture.transfer,
            profile=capture.profile,
            images=images,
        )

    def _send(self, job: Job) -> None:
        fields = job.submit_fields()
        fields["transfer"] = job.transfer
        try:
            ok = self.client.send("submit", images=job.images, **fields)
        except (ProtocolError, ValueError) as exc:
            job.fail(f"invalid request: {exc}")
            self.notice.emit(job.status_text, "error")
            return
        if ok:
            job.mark_sent()

    @guarded
    def cancel(self) -> None:
        """Cancel every unfinished job (not sent yet: dropped here; else asked of the service)."""
        for job in self.jobs.unfinished():
            if job.state is JobState.waiting:
                job.cancel_locally()
            elif self.client.is_connected:
                self.client.send("cancel", job=job.id)
        self.jobs_changed.emit()

    # --- events ------------------------------------------------------------------------------

    @guarded
    def _on_welcome(self, server: str, capabilities: dict) -> None:
        self._status_pending = None  # a status asked of an earlier connection will not come
        self.capabilities_changed.emit(server, capabilities)
        for job in self.jobs.waiting():
            self._send(job)
        if self.jobs.in_service():
            self._ask_status()
        self.jobs_changed.emit()

    @guarded
    def _on_message(self, msg: Message) -> None:
        if msg.type == "status":
            self._reconcile(msg.fields)
            return
        job = self.jobs.get(msg.job)
        if job is None:
            if msg.type == "error":
                self.notice.emit(f"Backend error: {msg['message']}", "error")
            return  # events of a job from an earlier session, or already forgotten
        job.touched = time.monotonic()
        if not job.on_event(msg.type, msg.fields):
            return
        if msg.type == "accepted":
            self.last_seed = job.seed
        elif msg.type == "progress" and "preview" in msg.images:
            image = preview_image(msg.images["preview"].spec, msg.images["preview"].data)
            if image is not None:
                self.preview_ready.emit(image)
        elif msg.type == "result":
            self.last_seed = job.seed
            self._apply(job, msg.images["image"])
        elif msg.type == "error":
            self.notice.emit(job.status_text, "error")
        self.jobs_changed.emit()

    def _apply(self, job: Job, image: Image) -> None:
        crop = job.plan.crop
        expected = job.fmt.spec(crop.width, crop.height)
        if image.spec != expected:
            job.fail(f"the backend returned {image.spec}, expected {expected}")
            self.notice.emit(job.status_text, "error")
            return
        try:
            reason = self.adapter.apply(job.target, crop, job.fmt, image.data, job.layer_name)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason is None:
            self.notice.emit(f"Added layer “{job.layer_name}”.", "info")
            return
        self.results.add(StoredResult(job.id, job.layer_name, crop, job.fmt, image.data, reason, job.seed, job.profile))
        self.notice.emit(f"The result is kept in the Results list: {reason}.", "warning")
        self.results_changed.emit()

    def _ask_status(self) -> None:
        self._status_pending = {j.id for j in self.jobs.in_service()}
        self.client.send("status", job=None)

    def _reconcile(self, fields: dict[str, Any]) -> None:
        asked, self._status_pending = self._status_pending, None
        if not asked:
            return
        mentioned = status_job_ids(fields)
        for job in self.jobs.in_service():
            if job.id in asked and job.id not in mentioned:
                job.lose("the backend no longer has this job (was it restarted?)")
                self.notice.emit(job.status_text, "warning")
        self.jobs_changed.emit()

    @guarded
    def resubmit(self) -> list[Job]:
        """Send every lost job again, with its settings and pixels as they were captured."""
        fresh = []
        for job in self.jobs.lost():
            new = job.resubmission()
            job.message = "resubmitted"
            job.state = JobState.cancelled
            self.jobs.add(new)
            if self.client.is_connected:
                self._send(new)
            fresh.append(new)
        self.jobs_changed.emit()
        return fresh

    @guarded
    def _check_silent_jobs(self) -> None:
        if not self.client.is_connected or self._status_pending is not None:
            return
        now = time.monotonic()
        if any(now - job.touched > STATUS_AFTER_SILENCE for job in self.jobs.in_service()):
            self._ask_status()

    # --- results list ------------------------------------------------------------------------

    @guarded
    def apply_result(self, job_id: str) -> None:
        self._result_action(job_id, self.adapter.apply_to_active, "Applied to the active document.")

    @guarded
    def open_result(self, job_id: str) -> None:
        self._result_action(job_id, self.adapter.open_as_document, "Opened as a new document.")

    @guarded
    def discard_result(self, job_id: str) -> None:
        if self.results.remove(job_id) is not None:
            self.results_changed.emit()

    def _result_action(self, job_id: str, action: Any, done: str) -> None:
        item = self.results.get(job_id)
        if item is None:
            return
        try:
            action(item)
        except (AdapterError, UnsupportedFormat) as exc:
            self.notice.emit(str(exc), "error")
            return
        except Exception as exc:
            self.notice.emit(f"{type(exc).__name__}: {exc}", "error")
            return
        self.results.remove(job_id)
        self.results_changed.emit()
        self.notice.emit(done, "info")

    # --- local backend -----------------------------------------------------------------------

    @guarded
    def start_backend(self) -> None:
        s = self.settings
        self.backend.start(s.backend_command, s.backend_args, s.endpoint)

    @guarded
    def stop_backend(self) -> None:
        self.backend.stop()
