"""The refine workflow: settings, connection, jobs and the results history, between the docker and Krita.

Pure Python: no Qt, no Krita, no socket. The outside comes in through ports (``core``), built by the
composition root (``compose.build_controller``): the document (``core.document.Adapter``; Krita's in Krita,
a fake in tests), the service (``core.connection.Connection``), the local backend and the setup's programs
(``core.processes``), timers, pictures and key files (``core.host``). Its events are ``core.signals.Signal``.
Every public method a button calls takes no arguments or a job/entry id, and is :func:`guarded`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from krita_sdxl.backend.setup.plan import mismatch
from krita_sdxl.backend.setup.plan.upscalers import MODELS_FOLDER
from krita_sdxl.protocol import Image, ImageSpec, Message, ProtocolError
from krita_sdxl.protocol.authorize import authorize_command
from krita_sdxl.protocol.geometry import Box, Extent
from krita_sdxl.protocol.policy import paints_from_noise

from ..core import settings as settings_mod
from ..core.connection import Connection, ConnectionState, CurveKeys
from ..core.document import Adapter, AdapterError, Capture, NotApplied, Placed
from ..core.guard import guarded
from ..core.history import THUMBNAIL_SIDE, Entry, History
from ..core.host import Background, KeyFiles, Pictures, Repeating, Timers
from ..core.jobs import Job, JobList, JobParams, JobState, new_job_id, new_seed, status_job_ids
from ..core.pixelformat import UnsupportedFormat
from ..core.plan import NothingToRefine, RefinePlan, plan_refine
from ..core.processes import LocalBackend, Processes
from ..core.settings import Settings
from ..core.signals import Signal
from ..core.thumbs import rgba8_thumbnail
from ..core.upscale import UPSCALE, UpscaleProblem
from . import upscale
from .capture import read_checked, reads_at_once
from .setup_runner import SetupRunner
from .upscaler_download import UpscalerDownload

STATUS_AFTER_SILENCE = 15.0  # seconds without news of a job in the service before asking for status
WATCH_MS = 5000  # how often jobs in the service are checked for silence
KEYS_FOLDER = "krita-sdxl-keys"  # in the application data: this computer's CURVE key pair


class Controller:
    settings_changed = Signal(object)  # Settings
    connection_changed = Signal(str, str)  # state, detail
    capabilities_changed = Signal(str, dict)  # server, capabilities
    jobs_changed = Signal()
    job_preview = Signal(str, object)  # job id, its latest step as the view shows it (Pictures.preview)
    notice = Signal(str, str)  # text, level: "info", "warning", "error"
    history_changed = Signal()
    backend_changed = Signal(str, str)  # state, detail
    backend_output = Signal(str)

    def __init__(
        self,
        adapter: Adapter,
        *,
        client: Connection,
        backend: LocalBackend,
        processes: Processes,
        timers: Timers,
        pictures: Pictures,
        keys: KeyFiles,
        app_data: Path,
        background: Background,
    ) -> None:
        self.adapter = adapter
        self.settings = settings_mod.load(adapter.read_setting)
        self.jobs = JobList()
        self.history = History()
        self.last_seed: int | None = None
        self.timers, self.pictures, self.keys, self.app_data = timers, pictures, keys, Path(app_data)
        self.background = background
        self.client = client
        self.client.state_changed.connect(self.connection_changed)
        self.client.welcomed.connect(self._on_welcome)
        self.client.received.connect(self._on_message)
        self.client.problem.connect(lambda text: self.notice.emit(text, "warning"))
        self.backend = backend
        self.backend.state_changed.connect(self.backend_changed)
        self.backend.state_changed.connect(self._on_backend_state)
        self.backend.output.connect(self.backend_output)
        self.setup = SetupRunner(self.backend, self._start_set_up_backend, processes, timers, self.app_data)
        s = self.settings
        self.setup.configure(self.setup.folder_of(s.setup_folder), s.setup_base, s.setup_torch)
        self.upscaler_download = UpscalerDownload(processes, lambda: self.setup.env)  # ⚙: Download upscaler
        self.upscaler_download.finished.connect(self._on_upscaler_downloaded)
        self.backend_mismatch: str | None = None  # the connected backend is not this plugin's version
        self._status_pending: set[str] | None = None
        self._watch: Repeating | None = None
        self.live: Any = None  # live refine (workflow/live.py), attached by the composition root when Krita has it

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.client.start()
        if self._watch is None:
            self._watch = self.timers.repeat(WATCH_MS, self._check_silent_jobs)

    def shutdown(self) -> None:
        if self.live is not None:
            self.live.shutdown()
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self.setup.cancel()
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
        if curve_of(new) != curve_of(old):
            self.client.set_curve(curve_of(new))
        if new.endpoint != old.endpoint:
            self.client.set_endpoint(new.endpoint)
        self.settings_changed.emit(new)

    def _with_client_keys(self, s: Settings) -> Settings:
        """With a server key but no client key yet, create this computer's key pair (once) and say
        what to do with its public key on the backend machine."""
        if not s.server_public_key.strip() or s.client_secret_key.strip():
            return s
        secret = self.keys.ensure_client_keys(self.app_data / KEYS_FOLDER)
        self.notice.emit(
            "Created this computer's key pair. On the backend machine run: "
            + authorize_command(self.keys.public_key_text(secret)),
            "info",
        )
        return s.changed(client_secret_key=str(secret))

    def authorize_line(self) -> str:
        """The shell line that authorizes this computer's key on the backend machine ("" without keys)."""
        secret = self.settings.client_secret_key.strip()
        public = self.keys.public_key_text(secret) if secret and self.settings.server_public_key.strip() else ""
        return authorize_command(public) if public else ""

    @property
    def backend_tiles_large_images(self) -> bool:
        """The connected backend refines large images at native size in tiles (capabilities.tiling)."""
        caps = self.client.capabilities or {}
        return bool(caps.get("tiling"))

    @property
    def supported_modes(self) -> list[str]:
        caps = self.client.capabilities or {}
        modes = caps.get("modes")
        known = [m for m in modes if isinstance(m, str)] if isinstance(modes, list) else ["refine"]
        return known + ([UPSCALE] if isinstance(caps.get("upscale"), dict) else [])  # core/upscale.py

    # --- jobs --------------------------------------------------------------------------------

    @guarded
    def refine(self) -> Job | None:
        """Capture the active document and submit (or queue until connected). A large layer's pixels are
        read off the UI thread: its job shows "Reading the pixels…" meanwhile. Never raises."""
        s = self.settings
        if self.client.capabilities and s.mode not in self.supported_modes:
            self.notice.emit(f"The backend does not support the {s.mode!r} mode.", "error")
            return None

        if s.mode == UPSCALE:
            return self._upscale(s)
        from_noise = paints_from_noise(s.mode, s.strength)

        def planner(canvas: Extent, source_bounds: Box, selection: Box | None) -> RefinePlan:
            return plan_refine(
                canvas,
                source_bounds,
                selection,
                s.strength,
                s.padding_fraction,
                s.feather_fraction,
                native_large=self.backend_tiles_large_images,
                from_noise=from_noise,
            )

        try:
            capture = self.adapter.capture(s.source, planner)
        except (UnsupportedFormat, NothingToRefine, AdapterError) as exc:
            self.notice.emit(str(exc), "error")
            return None
        except Exception as exc:  # a Krita surprise must never become a modal error dialog
            self.notice.emit(f"Could not read the document: {type(exc).__name__}: {exc}", "error")
            return None
        return self._read_then_submit(capture, lambda c: read_checked(c, from_noise), self._make_job(s, capture))

    def _read_then_submit(self, capture: Capture, check: Callable[[Capture], Capture], job: Job) -> Job | None:
        """``check`` reads the pixels and refuses an empty capture: at once for a small one, off the UI thread
        for a large one (its job shows "Reading the pixels…" meanwhile); then the job goes."""
        if reads_at_once(capture):
            try:
                check(capture)
            except Exception as exc:
                self.notice.emit(_unread(exc), "error")
                return None
            job.images = _images(capture)
            job.state = JobState.waiting
            return self._submit(job)
        self.jobs.add(job)
        self.jobs_changed.emit()
        self.background.run(lambda: check(capture), lambda read: self._on_read(job, read))
        return job

    @guarded
    def _on_read(self, job: Job, read: Capture | BaseException) -> None:
        """A large capture's pixels, read off the UI thread (or why not): the job goes on as any other."""
        if job.state is not JobState.reading:
            return  # cancelled meanwhile: the pixels go
        if isinstance(read, BaseException):
            self.jobs.remove(job.id)  # refused: as if it had been refused at the click
            self.notice.emit(_unread(read), "error")
            self.jobs_changed.emit()
            return
        job.images = _images(read)
        job.state = JobState.waiting
        self._submit(job)

    def _upscale(self, s: Settings) -> Job | None:
        """The Upscale mode (workflow/upscale.py): the region, the result's size, then as any job."""
        try:
            capture, target = upscale.capture(self.adapter, s)
        except (UnsupportedFormat, NothingToRefine, UpscaleProblem, AdapterError) as exc:
            self.notice.emit(str(exc), "error")
            return None
        except Exception as exc:  # a Krita surprise must never become a modal error dialog
            self.notice.emit(f"Could not read the document: {type(exc).__name__}: {exc}", "error")
            return None
        job = self._make_job(s, capture)
        job.params = replace(job.params, mode=UPSCALE, strength=s.upscale_strength, upscale=target)
        return self._read_then_submit(capture, upscale.read_checked, job)

    def _make_job(self, s: Settings, capture: Capture) -> Job:
        params = JobParams(
            mode=s.mode,
            prompt=s.prompt,
            negative_prompt=s.negative_prompt,
            strength=s.strength,
            steps=s.steps,
            guidance=s.guidance,
            seed=new_seed() if s.random_seed else s.seed,  # drawn now: a resubmission runs with it too
            preview=s.preview,
            denoising_end=s.denoising_end,
            keep_unmasked=s.keep_unmasked,
        )
        return Job(
            new_job_id(),
            params,
            capture.plan,
            capture.fmt,
            capture.target,
            transfer=capture.transfer,
            profile=capture.profile,
            images=_images(capture) if capture.reader is None else {},
            state=JobState.waiting if capture.reader is None else JobState.reading,
        )

    def _submit(self, job: Job) -> Job:
        self.jobs.add(job)
        if self.client.is_connected:
            self._send(job)
        elif self.client.state is ConnectionState.invalid:
            self.notice.emit(
                f"The endpoint cannot be used ({self.client.detail}); the job starts once it is fixed in ⚙.", "warning"
            )
        else:
            self.notice.emit("The backend is not connected; the job starts as soon as it is.", "warning")
        self.jobs_changed.emit()
        return job

    def _send(self, job: Job) -> None:
        try:
            ok = self.client.send("submit", images=job.images, **job.submit_fields())
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
            self._cancel(job)
        self.jobs_changed.emit()

    @guarded
    def cancel_job(self, job_id: str) -> None:
        """Cancel one job; a lost one is dropped (it will not be resubmitted)."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        if job.state is JobState.lost:
            job.cancel_locally("dropped")
            self.notice.emit(f"Dropped: “{job.layer_name}” (lost by the backend) will not be resubmitted.", "info")
        elif not job.state.finished:
            self._cancel(job)
        self.jobs_changed.emit()

    def _cancel(self, job: Job) -> None:
        """A job not sent yet ends here; one in the service is asked to stop (its ``cancelled`` event
        ends it, with a line in the message log)."""
        if job.state in (JobState.reading, JobState.waiting):
            job.cancel_locally()
            self.notice.emit(f"Cancelled: “{job.layer_name}” before it was sent.", "info")
        elif self.client.is_connected:
            self.client.send("cancel", job=job.id)

    @guarded
    def resubmit(self) -> list[Job]:
        """Send every lost job again, with its settings and pixels as they were captured."""
        fresh = []
        for job in self.jobs.lost():
            new = job.resubmission()
            job.message = "resubmitted"
            job.state = JobState.cancelled
            job.images = {}
            self.jobs.add(new)
            if self.client.is_connected:
                self._send(new)
            fresh.append(new)
        self.jobs_changed.emit()
        return fresh

    # --- events ------------------------------------------------------------------------------

    @guarded
    def _on_welcome(self, server: str, capabilities: dict) -> None:
        self._status_pending = None  # a status asked of an earlier connection will not come
        self.backend_mismatch = mismatch(capabilities.get("backend_version"))
        if self.backend_mismatch:
            self.notice.emit(self.backend_mismatch, "warning")
        self.capabilities_changed.emit(server, capabilities)
        if self.live is not None:
            self.live.on_welcome()
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
        if self.live is not None and self.live.handles(msg):
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
            image = self.pictures.preview(msg.images["preview"].spec, msg.images["preview"].data)
            if image is not None:
                self.job_preview.emit(job.id, image)
        elif msg.type == "result":
            self.last_seed = job.seed
            self._on_result(job, msg.images["image"])
        elif msg.type == "error":
            self.notice.emit(job.status_text, "error")
        elif msg.type == "cancelled" and job.state is JobState.lost:
            self.notice.emit(job.status_text, "warning")
        elif msg.type == "cancelled":
            self.notice.emit(f"Cancelled: “{job.layer_name}”{_at_step(job)}.", "info")
        self.jobs_changed.emit()

    def _on_result(self, job: Job, image: Image) -> None:
        crop = job.plan.crop if job.params.upscale is None else job.params.upscale.box
        expected = job.fmt.spec(*job.result_size)
        if image.spec != expected:
            job.fail(f"the backend returned {image.spec}, expected {expected}")
            self.notice.emit(job.status_text, "error")
            return
        p = job.params
        entry = Entry(
            id=job.id,
            name=job.layer_name,
            number=job.number,
            job=job,
            box=crop,
            fmt=job.fmt,
            profile=job.profile,
            target=job.target,
            data=image.data,
            prompt=p.prompt,
            seed=job.seed,
            strength=p.strength,
            mode=p.mode,
            elapsed=job.elapsed,
        )
        target = replace(job.target, above=self.history.layers_of_source(job.target, job.capture_id))
        try:
            if job.params.upscale is not None:
                self._upscaled(entry, upscale.place(self.adapter, job, image.data))
            else:
                self._placed(entry, self.adapter.apply(target, crop, job.fmt, image.data, job.layer_name))
        except NotApplied as exc:
            entry.note = f"not applied: {exc}"
            self.notice.emit(
                f"“{entry.name}” is kept in the history ({exc}): apply it to the active document or open it "
                "as a new document.",
                "warning",
            )
        except Exception as exc:
            entry.note = f"not applied: {type(exc).__name__}: {exc}"
            self.notice.emit(f"“{entry.name}” is kept in the history; applying it failed: {exc}", "error")
        self.keep_result(entry, job.transfer)

    def keep_result(self, entry: Entry, transfer: str, placed: Placed | None = None) -> None:
        """Add a result to the history (with its thumbnail), noting the layer it became, if any."""
        if placed is not None:
            self._placed(entry, placed)
        self._thumbnail(entry, transfer)
        self.history.add(entry)
        self.history_changed.emit()

    def _upscaled(self, entry: Entry, where: Placed | str) -> None:
        if isinstance(where, Placed):  # "Scale this document": scaled, the result as a layer
            self._placed(entry, where)
            return
        entry.applied, entry.note = True, f"opened as {where}"
        target = entry.job.params.upscale if entry.job is not None else None
        size = f" ({upscale.described(target)})" if target is not None else ""
        self.notice.emit(f"Opened “{entry.name}” as the new document {where}{size}.", "info")

    def _placed(self, entry: Entry, placed: Placed, own_document: bool = True) -> None:
        entry.applied = True
        if own_document:
            entry.layer_ids.append(placed.layer_id)
        if placed.handle is not None and not entry.belongs_to(placed.handle):
            entry.documents.append(placed.handle)
        entry.note = f"in {placed.document}"
        where = placed.document if placed.active else f"{placed.document} (not the document shown now)"
        self.notice.emit(f"Added layer “{entry.name}” to {where}.", "info")

    def _thumbnail(self, entry: Entry, transfer: str) -> None:
        try:
            w, h, rgba = rgba8_thumbnail(
                entry.fmt, transfer, entry.box.width, entry.box.height, entry.data, THUMBNAIL_SIDE
            )
            entry.thumbnail = self.pictures.thumbnail(w, h, rgba)
        except Exception:  # a thumbnail is a nicety: the entry stays without one
            entry.thumbnail = None

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
    def _check_silent_jobs(self) -> None:
        if not self.client.is_connected or self._status_pending is not None:
            return
        now = time.monotonic()
        if any(now - job.touched > STATUS_AFTER_SILENCE for job in self.jobs.in_service()):
            self._ask_status()

    # --- results history ---------------------------------------------------------------------

    @guarded
    def apply_result(self, entry_id: str) -> None:
        """Add the result as a new layer of the active document, above its active layer."""
        entry = self._entry_with_pixels(entry_id)
        if entry is not None:
            placed = self._document_action(
                lambda: self.adapter.apply_to_active(entry.name, entry.box, entry.fmt, entry.data)
            )
            if placed is not None:
                self._placed(entry, placed, own_document=False)
                self.history_changed.emit()

    @guarded
    def open_result(self, entry_id: str) -> None:
        entry = self._entry_with_pixels(entry_id)
        if entry is not None:
            name = self._document_action(
                lambda: self.adapter.open_as_document(entry.name, entry.box, entry.fmt, entry.profile, entry.data)
            )
            if name is not None:
                self.notice.emit(f"Opened “{entry.name}” as the new document {name}.", "info")

    @guarded
    def discard_result(self, entry_id: str) -> None:
        if self.history.remove(entry_id) is not None:
            self.history_changed.emit()

    @guarded
    def again(self, entry_id: str) -> Job | None:
        """Run the job of a history entry once more with a new seed, from the pixels it was captured
        with (not the layer that is active now); its result goes above the earlier ones, as every result."""
        entry = self.history.get(entry_id)
        if entry is None or entry.job is None or not entry.can_again:
            self.notice.emit("The source pixels of this result were dropped to save memory.", "warning")
            return None
        return self._submit(entry.job.again())

    def _entry_with_pixels(self, entry_id: str) -> Entry | None:
        entry = self.history.get(entry_id)
        if entry is not None and not entry.has_pixels:
            self.notice.emit("The pixels of this result were dropped to save memory.", "warning")
            return None
        return entry

    def _document_action(self, action: Any) -> Any:
        try:
            return action()
        except (AdapterError, NotApplied, UnsupportedFormat) as exc:
            self.notice.emit(str(exc), "error")
        except Exception as exc:
            self.notice.emit(f"{type(exc).__name__}: {exc}", "error")
        return None

    # --- local backend -----------------------------------------------------------------------

    @guarded
    def _on_backend_state(self, state: str, detail: str) -> None:
        if state in ("stopped", "failed") and self.client.state is not ConnectionState.invalid:
            self.client.reconnect(f"the local backend {'stopped' if state == 'stopped' else 'failed'}; retrying")

    @guarded
    def start_backend(self) -> None:
        s = self.settings
        extra = ["--upscaler", s.upscaler_file] if s.upscaler_file and "--upscaler" not in s.backend_args else []
        self.backend.start(s.backend_command, s.backend_args, s.endpoint, extra)

    @guarded
    def stop_backend(self) -> None:
        self.backend.stop()

    @guarded
    def download_upscaler(self) -> None:
        """Fetch the upscaler model into the models folder with the local backend's command (a click in ⚙)."""
        self.upscaler_download.start(self.settings.backend_command, self.setup.folder / MODELS_FOLDER)

    @guarded
    def _on_upscaler_downloaded(self, ok: bool, message: str) -> None:
        if ok and self.upscaler_download.path is not None:
            self.update_settings(upscaler_file=str(self.upscaler_download.path))
            running = self.backend.state.value in ("starting", "running")
            message += " Restart the local backend (■ Stop, ▶ Start) to use it." if running else (
                " The local backend uses it from its next start.")  # fmt: skip
        self.notice.emit(message, "info" if ok else "error")

    def _start_set_up_backend(self, python: str) -> None:
        """The setup's last step: its environment's Python serves as the local backend from now on."""
        self.update_settings(backend_command=python, backend_args="serve")
        self.start_backend()


def _unread(exc: BaseException) -> str:
    """Why a capture's pixels were not sent, for the message log."""
    if isinstance(exc, (NothingToRefine, AdapterError)):
        return str(exc)
    return f"Could not read the document: {type(exc).__name__}: {exc}"


def _images(capture: Capture) -> dict[str, Image]:
    """A capture's frames: the pixels, and the selection's mask."""
    crop = capture.plan.crop
    images = {"image": Image(capture.fmt.spec(crop.width, crop.height), capture.pixels)}
    if capture.mask is not None:
        images["mask"] = Image(ImageSpec(crop.width, crop.height, "L", 8, "uint"), capture.mask)
    return images


def _at_step(job: Job) -> str:
    """`` at step 3/15`` for a job that had started, else nothing."""
    return f" at step {job.step}/{job.total}" if job.step and job.total else ""


def curve_of(s: Settings) -> CurveKeys | None:
    """The CURVE keys the settings name (None: a backend on this machine, no keys)."""
    return CurveKeys.from_settings(s.server_public_key, s.client_secret_key)
