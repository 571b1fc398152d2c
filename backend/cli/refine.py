"""``krita-sdxl refine``: one picture through a running service (or ``--local``), every check first.

Order: flags, the input picture's header (size and format: nothing decoded), output file, job fields
(the protocol codec), endpoint and keys; then the service's ``welcome``, whose limits (largest picture,
longest prompt) are checked before the picture is decoded and sent; with ``--local`` the model loads.
Ctrl-C cancels the job on the service. A result that arrives is always kept: when its file cannot be
written it goes to the temporary folder.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from typing import Any

from krita_sdxl.backend.common.config import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_JOB_LOST, CommandFailed, ConfigError

from .imageio import Layout, Output, Picture, keep_somewhere, peek_picture, plan_output, read_picture, write_picture
from .job_options import check_fields, check_job, check_limits, job_fields, step_note
from .upscale_flags import upscale_field


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


UPLOAD_BAR_BYTES = 4 * 2**20  # one credit window (protocol/README.md, Streams); smaller uploads show no bar
NO_RATE = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]"  # until a second step gives a rate (no "?step/s")


class Progress:
    """One progress bar on stderr: the upload's bytes while the picture goes up (a large layer over a
    slow link takes a while), then the steps, made when their count is known; each step drawn once."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.uploading = False

    def upload(self, received: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            if total <= UPLOAD_BAR_BYTES:  # goes up in one credit window: a bar would only flash
                return
            self.bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="upload", leave=False,
                mininterval=0.2, file=sys.stderr, bar_format=NO_RATE,
            )  # fmt: skip
            self.uploading = True
        if self.uploading and received > self.bar.n:
            self.bar.bar_format = None  # tqdm's own, with the rate, once bytes have moved
            self.bar.update(received - self.bar.n)

    def step(self, step: int, total: int) -> None:
        from tqdm import tqdm

        if self.uploading:  # the upload is over: its bar makes way for the steps'
            self.close()
        if self.bar is None:  # made at the first step, which counts as done before the bar (no rate from it)
            self.bar = tqdm(total=total, initial=step, unit="step", desc="refine", leave=False, mininterval=0,
                            file=sys.stderr, bar_format=NO_RATE)  # fmt: skip
        self.bar.total = total  # tiles x steps when the service tiles a large picture
        if step != self.bar.n:
            self.bar.bar_format = None  # tqdm's own, with the rate of the steps since the first
            self.bar.update(step - self.bar.n)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        say(text)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.uploading = False


def cmd_refine(args: argparse.Namespace) -> int:
    from .options import given_local_flags

    local_flags = given_local_flags(args)
    if local_flags and not args.local:
        verb = "applies" if len(local_flags) == 1 else "apply"
        raise ConfigError(
            f"{', '.join(local_flags)} {verb} only with --local; a service runs its own model and device "
            "(set them on `krita-sdxl serve`)"
        )
    if args.local and (args.server_key or args.client_key):
        raise ConfigError("--server-key and --client-key are for a service; --local needs none")
    layout = peek_picture(args.input)  # size and format from the header: nothing decoded yet
    out = plan_output(args.output, layout, source=args.input)
    fields = job_fields(args)
    spec = layout.spec
    fields.update(upscale_field(args, spec.width, spec.height, str(args.input)))  # --upscale, --upscale-to
    check_fields(layout.spec, fields)
    if args.local:
        picture, out = _decode(args, layout, out)
        t0 = time.perf_counter()
        result, seed, job = _refine_local(args, check_job(picture.image, fields))
    else:
        from .connection import connect

        with connect(args) as client:
            limits = _hello(client).get("limits") or {}  # what the service takes, before any pixel is decoded
            check_limits(layout.spec, fields, limits, str(args.input))
            picture, out = _decode(args, layout, out)
            t0 = time.perf_counter()
            result, seed, job = _refine_remote(client, picture, fields)
    save(out, result, job)
    s = result.spec
    print(f"wrote {out.path} ({s.width}x{s.height}, {out.describe}, seed {seed}, {time.perf_counter() - t0:.2f} s)")
    return 0


def _hello(client: Any) -> dict[str, Any]:
    """The service's capabilities (its ``welcome``); CommandFailed when it cannot be reached."""
    from .client import JobFailed, ServiceUnavailable

    try:
        return client.hello()["capabilities"]
    except (ServiceUnavailable, JobFailed) as exc:
        raise CommandFailed(str(exc)) from None


def _decode(args: argparse.Namespace, layout: Layout, out: Output) -> tuple[Picture, Output]:
    """The picture's pixels; the output planned again if they came out in another format than its header said."""
    picture = read_picture(args.input)
    if (picture.spec.order, picture.spec.depth, picture.spec.sample, picture.grey) != (
        layout.spec.order, layout.spec.depth, layout.spec.sample, layout.grey
    ):  # fmt: skip
        out = plan_output(args.output, picture, source=args.input)
    for line in [*picture.notes, out.note]:
        if line:
            say(line)
    return picture, out


def save(out: Output, result: Any, job: str) -> None:
    """Write the result; if that fails now, keep it in the temporary folder and say where."""
    try:
        write_picture(out, result)
    except OSError as exc:
        kept = keep_somewhere(out, result, job)
        raise CommandFailed(f"cannot write {out.path} ({exc.strerror or exc}); the result is kept in {kept}") from None


def _refine_remote(client: Any, picture: Picture, fields: dict[str, Any]) -> tuple[Any, int, str]:
    from .client import JobLost, ServiceUnavailable

    progress = Progress()
    job = client.submit(picture.image, **fields)
    total = picture.image.spec.byte_length
    try:
        for event in client.events(job):
            if event.type == "credit":
                progress.upload(event["received"], total)
            elif event.type == "accepted":
                if progress.uploading:
                    progress.upload(total, total)
                    progress.close()
                note = step_note(fields["steps"], fields["strength"], event["steps"], event["denoise_steps"],
                                 fields["mode"])  # fmt: skip
                for line in (note, f"queued: {event['position']} job(s) ahead" if event["position"] else None):
                    if line:
                        progress.note(line)
            elif event.type == "progress":
                progress.step(event["step"], event["total"])
            elif event.type == "result":
                return event.images["image"], event["seed"], job
            else:  # error or cancelled
                code = event.fields.get("code") or event.fields.get("reason", "cancelled")
                text = event.fields.get("message") or f"the job was cancelled ({code})"
                field = event.fields.get("field")
                raise CommandFailed(f"{code}: {text}" + (f" (field {field})" if field else ""))
    except KeyboardInterrupt:
        progress.close()
        outcome = _interrupted(client, job)
        if isinstance(outcome, CommandFailed):
            raise outcome from None
        say("interrupted, but the job had already finished: keeping its result")
        return outcome.images["image"], outcome["seed"], job
    except JobLost as exc:
        raise CommandFailed(f"{exc}; run the command again", EXIT_JOB_LOST) from None
    except ServiceUnavailable as exc:
        raise CommandFailed(str(exc), EXIT_FAILED) from None
    finally:
        progress.close()
    raise CommandFailed("the service ended the job without a result")


def _interrupted(client: Any, job: str, wait: float = 10.0) -> Any:
    """Ctrl-C: cancel the job on the service and wait for its answer (a second Ctrl-C: at once).
    Returns the CommandFailed to raise, or the result event when the job finished meanwhile."""
    from .client import ServiceUnavailable

    how = f"asked the service to cancel job {job}; no answer within {wait:g} s"
    try:
        client.cancel(job)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            event = client.receive(timeout=max(deadline - time.monotonic(), 0.01))
            if event.job == job and event.type == "result":
                return event
            if event.job == job and event.type in ("cancelled", "error"):
                how = f"job {job} cancelled on the service"
                break
    except KeyboardInterrupt:
        how = f"asked the service to cancel job {job} (not waiting for its answer)"
    except ServiceUnavailable as exc:
        how = f"could not ask the service to cancel job {job}: {exc}"
    return CommandFailed(f"interrupted: {how}", EXIT_INTERRUPTED)


def _refine_local(args: argparse.Namespace, message: Any) -> tuple[Any, int, str]:
    from krita_sdxl.backend.engine.loading import load_engine, tiling
    from krita_sdxl.backend.engine.request import RefineRequest

    from .options import resolve
    from .preflight import check_local

    settings = resolve(args)
    check_local(settings)
    upscale = message["upscale"]
    if upscale is not None and upscale.method == "model" and not settings.upscaler:
        raise ConfigError("--upscale-method model needs an upscaler model file here: --upscaler FILE")
    tiles = tiling(settings)
    say(f"loading {'the demo model' if settings.demo else settings.model} (device {settings.device}) ...")
    engine = load_engine(settings)
    engine.tiling = tiles
    seed = message["seed"] if message["seed"] is not None else secrets.randbelow(2**32)
    req = RefineRequest.from_message(message, seed, engine.timesteps)  # as the service plans it
    progress = Progress()
    note = step_note(message["steps"], message["strength"], req.plan.steps, req.plan.denoise_steps, req.mode)
    if note:
        say(note)
    try:
        result = engine.refine(req, lambda step, total, _preview: progress.step(step, total), lambda: False)
    finally:
        progress.close()
    return result, seed, "local"
