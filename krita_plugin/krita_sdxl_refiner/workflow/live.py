"""Live refine: while Live is on, every change to the source starts a refine once the canvas is still, and
the newest result replaces the last one in the one preview layer. Pure Python: no Qt, no Krita.

The loop: a timer ticks every ``TICK_MS``; a tick checks one band of the watched pixels (``core.live_watch``)
and, once nothing has changed for the wait (``live_wait_ms``), captures the source as the Refine button does
and sends an ordinary refine job with the live caps (``core.live_plan``), ``live`` set and ``replaces``
naming the previous live job: the service stops or drops the older one (``superseded``). Prompt, strength
and the other job settings changing, the selection changing, and "New seed" start a job the same way.

A result is shown when it is newer than the one shown (a superseded job that finished first may still
come in: it is shown only if nothing newer has been); while the artist's pen is down it waits for the
stroke to end (``LiveBusy``). The seed is fixed for the session. ``latency`` is the time from the last
change seen (the stroke's end, within one tick) to the preview shown; ``timeline`` keeps each update's
moments for the benchmark.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from krita_sdxl.protocol import Image, ImageSpec, Message, ProtocolError
from krita_sdxl.protocol.geometry import Box, Extent

from ..core.document import AdapterError, Capture, NotApplied
from ..core.guard import guarded
from ..core.history import Entry
from ..core.host import Repeating, Timers
from ..core.jobs import Job, JobState, new_job_id
from ..core.live_plan import live_inputs, live_params, live_plan
from ..core.live_port import LiveBusy, LiveGone, LivePort
from ..core.live_watch import IDLE_CHECK_S, Stillness, Watch, watched_box
from ..core.pixelformat import UnsupportedFormat, any_visible
from ..core.plan import NothingToRefine, RefinePlan, layer_name, nothing_visible, plan_refine
from ..core.signals import Signal

TICK_MS = 30  # how often the watched pixels are checked while the canvas changes
TIMELINE = 1000  # updates whose moments are kept (for the benchmark)


@dataclass
class LiveJob:
    """One live job and its moments (``clock`` seconds)."""

    job: Job
    seq: int
    changed_at: float  # the last change seen before it was started
    fired_at: float  # the canvas was still: capture started
    sent_at: float = 0.0
    result_at: float = 0.0
    result: Image | None = None


class LiveRefine:
    changed = Signal()  # the state shown in the docker changed (on, status, latency, seed, can_apply)

    def __init__(self, controller: Any, port: LivePort, timers: Timers, clock: Callable[[], float] = time.monotonic):
        self.controller = controller
        self.port = port
        self.timers = timers
        self.clock = clock
        self.notice = controller.notice  # for ``guarded``
        self.on = False
        self.seed: int | None = None
        self.status = "Off"
        self.latency: float | None = None  # seconds, stroke end to preview shown (the last update)
        self.superseded = 0  # live jobs the service stopped or dropped for a newer one (this session)
        self.timeline: deque[dict[str, Any]] = deque(maxlen=TIMELINE)
        self._session: Any = None
        self._timer: Repeating | None = None
        self._watch = Watch()
        self._still = Stillness(0.25)
        self._last_check = 0.0
        self._armed = False  # a tick is set for the end of the wait
        self._jobs: dict[str, LiveJob] = {}  # sent and not ended
        self._seq = 0
        self._last_id: str | None = None  # the newest live job sent: the next one replaces it
        self._sent: deque[str] = deque(maxlen=64)  # ids of recent live jobs (their late events are ours)
        self._shown: LiveJob | None = None
        self._waiting_result: LiveJob | None = None  # a result held back while a stroke is under way
        self._inputs: tuple[object, ...] = ()
        self._said = ""  # the last problem told in the message log (each is told once)
        controller.settings_changed.connect(self._on_settings)

    # --- the docker's buttons ----------------------------------------------------------------

    @property
    def can_apply(self) -> bool:
        return self.on and self._shown is not None and self._shown.result is not None

    @guarded
    def set_on(self, on: bool) -> None:
        if on == self.on:
            self.changed.emit()
            return
        if on:
            self._start()
        else:
            self._stop("Off")

    @guarded
    def new_seed(self) -> None:
        self.seed = secrets.randbelow(2**32)
        if self.on:
            self._still.changed(self.clock() - self._still.wait_s)  # at the next tick
        self.changed.emit()

    @guarded
    def apply(self) -> None:
        """Copy the preview into a normal result layer (one undo step) and the results history."""
        shown = self._shown
        if not self.can_apply or shown is None or shown.result is None:
            self.notice.emit("Nothing to apply yet: the live preview is still empty.", "warning")
            return
        job, p = shown.job, shown.job.params
        name = layer_name(job.number, "live", p.prompt, job.seed)
        try:
            placed = self.port.apply(self._session, name, job.plan.crop, shown.result.data)
        except (LiveGone, NotApplied, AdapterError) as exc:
            self.notice.emit(f"Could not apply the live preview: {exc}", "error")
            return
        self._rebaseline()  # the new layer and its undo step are no change to refine
        entry = Entry(id=new_job_id(), name=name, job=job, box=job.plan.crop, fmt=job.fmt, profile=job.profile,
                      target=job.target, data=shown.result.data, prompt=p.prompt, seed=job.seed, strength=p.strength,
                      mode=p.mode, elapsed=job.elapsed)  # fmt: skip
        self.controller.keep_result(entry, job.transfer, placed)

    # --- the controller's hooks --------------------------------------------------------------

    def handles(self, msg: Message) -> bool:
        """True for an event of a live job (then handled here, not by the controller)."""
        live = self._jobs.get(msg.job) if msg.job else None
        if live is None:
            return msg.job in self._sent  # a late event of a live job that ended or was abandoned
        self._on_event(live, msg)
        return True

    def shutdown(self) -> None:
        """Krita is quitting: stop the loop; the documents are left as they are (they are closing)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.on = False

    def on_welcome(self) -> None:
        """A (re)connection: live jobs sent before it may be lost; start a fresh one."""
        if self.on and (self._jobs or self._still.pending):
            self._jobs.clear()
            self._still.changed(self.clock() - self._still.wait_s)

    # --- session -----------------------------------------------------------------------------

    def _start(self) -> None:
        s = self.controller.settings
        try:
            self._session = self.port.start(s.source)
        except (AdapterError, UnsupportedFormat) as exc:
            self._tell(f"Live cannot start: {exc}", "error")
            self.changed.emit()
            return
        self.on = True
        self.seed = s.seed if not s.random_seed else secrets.randbelow(2**32)
        self.superseded = 0
        self.latency = None
        self._shown = self._waiting_result = None
        self._said = ""
        self._inputs = live_inputs(s)
        self._still = Stillness(s.live_wait_ms / 1000)
        self._watch = Watch()
        self._still.changed(self.clock() - self._still.wait_s)  # the first preview at once
        self.status = "Live: starting…"
        self._timer = self.timers.repeat(TICK_MS, self._tick)
        self.port.notify(self._session, lambda: self.timers.later(0, self._tick))  # Krita's edit signal: check now
        self.changed.emit()

    def _stop(self, status: str) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        for job_id in list(self._jobs):
            if self.controller.client.is_connected:
                self.controller.client.send("cancel", job=job_id)
        self._jobs.clear()
        if self._session is not None:
            self.port.stop(self._session)
        self._session = None
        self._shown = self._waiting_result = None
        self.on = False
        self.status = status
        self.changed.emit()

    def _gone(self, exc: Exception) -> None:
        self._stop("Off")
        self._tell(f"Live is off: {exc}", "warning")

    # --- the loop ----------------------------------------------------------------------------

    @guarded
    def _tick(self) -> None:
        if not self.on:
            return
        now = self.clock()
        try:
            if self._waiting_result is not None:
                self._show(self._waiting_result)
            if self._still.busy(now) or now - self._last_check >= IDLE_CHECK_S:
                self._check(now)
            if self._still.due(now):
                self._fire(now)
        except LiveGone as exc:
            self._gone(exc)

    def _check(self, now: float) -> None:
        self._last_check = now
        s = self.controller.settings
        shape = self.port.shape(self._session)
        box = watched_box(shape.canvas, shape.selection, s.padding_fraction)
        if self._watch.check(shape, box, lambda b: self.port.read(self._session, b)):
            self._still.changed(now)
            self._arm()

    def _arm(self) -> None:
        """A tick at the moment the wait ends (not up to a tick later); one outstanding at a time."""
        if not self._armed:
            self._armed = True
            left = self._still.changed_at + self._still.wait_s - self.clock()
            self.timers.later(max(0, int(left * 1000) + 1), self._on_due)

    @guarded
    def _on_due(self) -> None:
        self._armed = False
        if self.on and self._still.pending:
            if self._still.due(self.clock()):
                self._tick()
            else:
                self._arm()  # a newer change moved the end of the wait

    def _rebaseline(self) -> None:
        """After the plugin changed the document itself (Apply): what is seen now is not a change."""
        s = self.controller.settings
        try:
            shape = self.port.shape(self._session)
            self._watch.reset(shape, watched_box(shape.canvas, shape.selection, s.padding_fraction),
                              lambda b: self.port.read(self._session, b))  # fmt: skip
        except LiveGone as exc:
            self._gone(exc)

    def _fire(self, now: float) -> None:
        client = self.controller.client
        if not client.is_connected:
            self._set_status("Live: waiting for the backend…")
            return
        s = self.controller.settings
        assert self.seed is not None

        def planner(canvas: Extent, source_bounds: Box, selection: Box | None) -> RefinePlan:
            plan = plan_refine(canvas, source_bounds, selection, s.strength, s.padding_fraction, s.feather_fraction)
            return live_plan(plan, s.live_side)

        try:
            capture = self.port.capture(self._session, planner)
        except LiveBusy:
            return  # the pen is down: the next tick tries again
        except (UnsupportedFormat, NothingToRefine, AdapterError) as exc:
            self._still.fired()
            self._problem(str(exc))
            return
        self._still.fired()
        if not any_visible(capture.fmt, capture.pixels, capture.mask):
            t = capture.target
            self._problem(nothing_visible(t.source, t.description, capture.mask is not None))
            return
        self._send(self._make_job(capture), now)

    def _make_job(self, capture: Capture) -> Job:
        crop = capture.plan.crop
        images = {"image": Image(capture.fmt.spec(crop.width, crop.height), capture.pixels)}
        if capture.mask is not None:
            images["mask"] = Image(ImageSpec(crop.width, crop.height, "L", 8, "uint"), capture.mask)
        assert self.seed is not None
        return Job(new_job_id(), live_params(self.controller.settings, self.seed), capture.plan, capture.fmt,
                   capture.target, transfer=capture.transfer, profile=capture.profile, images=images)  # fmt: skip

    def _send(self, job: Job, fired_at: float) -> None:
        fields = {**job.submit_fields(), "live": True, "replaces": self._last_id}
        try:
            ok = self.controller.client.send("submit", images=job.images, **fields)
        except (ProtocolError, ValueError) as exc:
            self._problem(f"invalid request: {exc}")
            return
        if not ok:
            self._set_status("Live: waiting for the backend…")
            self._still.changed(self.clock() - self._still.wait_s)
            return
        job.mark_sent()
        self._seq += 1
        live = LiveJob(job, self._seq, self._still.changed_at, fired_at, sent_at=self.clock())
        self._jobs[job.id] = live
        self._sent.append(job.id)
        self._last_id = job.id
        self._set_status("Live: refining…")

    # --- events ------------------------------------------------------------------------------

    def _on_event(self, live: LiveJob, msg: Message) -> None:
        job = live.job
        job.on_event(msg.type, msg.fields)
        if msg.type == "result":
            self._jobs.pop(job.id, None)
            live.result_at = self.clock()
            image = msg.images["image"]
            expected = job.fmt.spec(job.plan.crop.width, job.plan.crop.height)
            if image.spec != expected:
                self._problem(f"the backend returned {image.spec}, expected {expected}")
                return
            live.result = image
            newest = max((j.seq for j in (self._shown, self._waiting_result) if j is not None), default=0)
            if live.seq > newest:  # an older job that finished before it was superseded: not shown
                self._show(live)
        elif msg.type in ("error", "cancelled") or job.state is JobState.lost:
            self._jobs.pop(job.id, None)
            if msg.type == "cancelled" and msg["reason"] == "superseded":
                self.superseded += 1
            elif msg.type == "error":
                self._problem(job.status_text)
        elif msg.type == "progress" and job.id == self._last_id:
            self._set_status(f"Live: step {job.step}/{job.total}")

    def _show(self, live: LiveJob) -> None:
        assert live.result is not None
        try:
            self.port.show(self._session, live.job.plan.crop, live.job.fmt, live.result.data)
        except LiveBusy:
            self._waiting_result = live
            return
        except LiveGone as exc:
            self._gone(exc)
            return
        shown_at = self.clock()
        self._waiting_result = None
        self._shown = live
        self.latency = shown_at - live.changed_at
        self.timeline.append({"job": live.job.id, "changed": live.changed_at, "fired": live.fired_at,
                              "sent": live.sent_at, "result": live.result_at, "shown": shown_at})  # fmt: skip
        self._said = ""
        self.status = f"Live: {self.latency:.2f} s"
        self.changed.emit()

    # --- settings and messages ---------------------------------------------------------------

    def _on_settings(self, s: Any) -> None:
        if not self.on:
            return
        self._still.wait_s = s.live_wait_ms / 1000
        if self._session is not None and getattr(self._session, "source", s.source) != s.source:
            self._stop("Off")  # the source changed: a new session on the new source
            self._start()
            return
        inputs = live_inputs(s)
        if inputs != self._inputs:
            self._inputs = inputs
            self._still.changed(self.clock())

    def _set_status(self, text: str) -> None:
        if text != self.status:
            self.status = text
            self.changed.emit()

    def _problem(self, text: str) -> None:
        self._set_status("Live: " + text)
        self._tell(text, "error")

    def _tell(self, text: str, level: str) -> None:
        if text != self._said:  # a problem that lasts is told once, not at every change
            self._said = text
            self.notice.emit(text, level)
