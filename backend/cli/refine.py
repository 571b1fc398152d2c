"""``krita-sdxl refine``: one picture through a running service (or ``--local``), every check first.

Order: flags, input picture, output file, job fields (the protocol codec), keys and endpoint; only
then a connection or a model load. Ctrl-C cancels the job on the service. A result that arrives is
always kept: when its file cannot be written it goes to the temporary folder.
"""

from __future__ import annotations

import argparse
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from krita_sdxl.backend.common.config import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_JOB_LOST, CommandFailed, ConfigError

from .imageio import Output, Picture, keep_somewhere, plan_output, read_picture, write_picture
from .job_options import check_job, job_fields, step_note
from .upscale_flags import upscale_field


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def add_connection_flags(parser: argparse.ArgumentParser, timeout: float) -> None:
    from .client import DEFAULT_ENDPOINT

    g = parser.add_argument_group("service")
    g.add_argument(
        "--endpoint",
        default=DEFAULT_ENDPOINT,
        help=f"the service's address: tcp://HOST:PORT, ipc://PATH or ipc (default: {DEFAULT_ENDPOINT})",
    )
    g.add_argument(
        "--timeout",
        type=seconds,
        default=timeout,
        help=f"seconds without any answer from the service (not even a heartbeat) before giving up "
        f"(default: {timeout:g})",
    )
    g.add_argument("--server-key", metavar="KEY|FILE", help="a CURVE service's public key, or its .key file")
    g.add_argument(
        "--client-key",
        metavar="FILE",
        type=Path,
        help="this client's NAME.key_secret (from `krita-sdxl keys`; its public key authorized on the service)",
    )


def client_keys(args: argparse.Namespace) -> dict[str, Any]:
    """ServiceClient's CURVE arguments from --server-key and --client-key, checked."""
    import zmq.auth
    import zmq.utils.z85

    if args.server_key is None and args.client_key is None:
        return {}
    if args.server_key is None or args.client_key is None:
        raise ConfigError("CURVE needs both --server-key (the service's public key) and --client-key (yours)")
    key = args.server_key.strip()
    if Path(key).expanduser().is_file():
        try:
            key = zmq.auth.load_certificate(str(Path(key).expanduser()))[0].decode("ascii")
        except (OSError, ValueError):
            raise ConfigError(f"--server-key {args.server_key}: no public key in that file") from None
    try:
        valid = len(key) == 40 and len(zmq.utils.z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError, TypeError):
        valid = False
    if not valid:
        raise ConfigError("--server-key: expected the service's 40-character public key, or its .key file")
    try:
        secret = zmq.auth.load_certificate(str(args.client_key.expanduser()))[1]
    except (OSError, ValueError):
        secret = None
    if not secret:
        raise ConfigError(f"--client-key {args.client_key}: no secret key there; give a NAME.key_secret file")
    return {"server_key": key, "client_secret_file": args.client_key.expanduser()}


class Progress:
    """One progress bar on stderr, made when the step count is known; each step drawn once."""

    def __init__(self) -> None:
        self.bar: Any = None

    def step(self, step: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:  # made at the first step, which counts as done before the bar (no rate from it)
            self.bar = tqdm(
                total=total, initial=step, unit="step", desc="refine", leave=False, mininterval=0, file=sys.stderr
            )
        self.bar.total = total  # tiles x steps when the service tiles a large picture
        if step != self.bar.n:
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
    picture = read_picture(args.input)
    out = plan_output(args.output, picture, source=args.input)
    fields = job_fields(args)
    spec = picture.image.spec
    fields.update(upscale_field(args, spec.width, spec.height, str(args.input)))  # --upscale, --upscale-to
    message = check_job(picture.image, fields)
    for line in [*picture.notes, out.note]:
        if line:
            say(line)
    t0 = time.perf_counter()
    if args.local:
        result, seed, job = _refine_local(args, message)
    else:
        result, seed, job = _refine_remote(args, picture, fields)
    save(out, result, job)
    s = result.spec
    print(f"wrote {out.path} ({s.width}x{s.height}, {picture.describe}, seed {seed}, {time.perf_counter() - t0:.2f} s)")
    return 0


def save(out: Output, result: Any, job: str) -> None:
    """Write the result; if that fails now, keep it in the temporary folder and say where."""
    try:
        write_picture(out, result)
    except OSError as exc:
        kept = keep_somewhere(out, result, job)
        raise CommandFailed(f"cannot write {out.path} ({exc.strerror or exc}); the result is kept in {kept}") from None


def connect(args: argparse.Namespace) -> Any:
    """A ServiceClient for --endpoint and the keys: ConfigError for what was typed wrong (exit 2),
    CommandFailed when the service cannot be used (its ipc socket is missing or not yours: exit 1)."""
    from krita_sdxl.protocol.endpoint import EndpointError, parse_endpoint

    from .client import ServiceClient

    try:
        parse_endpoint(args.endpoint)
    except EndpointError as exc:
        raise ConfigError(str(exc)) from None
    keys = client_keys(args)
    try:
        return ServiceClient(args.endpoint, timeout=args.timeout, **keys)
    except EndpointError as exc:
        raise CommandFailed(str(exc)) from None


def _refine_remote(args: argparse.Namespace, picture: Picture, fields: dict[str, Any]) -> tuple[Any, int, str]:
    from .client import JobLost, ServiceUnavailable

    client = connect(args)
    progress = Progress()
    with client:
        job = client.submit(picture.image, **fields)
        try:
            for event in client.events(job):
                if event.type == "accepted":
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
