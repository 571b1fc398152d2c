"""Command line: ``krita-sdxl serve | refine | demo | info | keys | authorize | setup``.

Every command checks what it was given before any work (a model load, a connection, a job) and
reports a problem in one line: exit status 2 for a bad flag, setting, file or model, 1 when the work
failed, 3 when the service lost the job, 130 on Ctrl-C. No tracebacks (``--log-level debug`` logs them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import NoReturn

from krita_sdxl.backend.common.config import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CommandFailed,
    ConfigError,
    Settings,
)
from krita_sdxl.backend.engine.loading import configure_logging, load_engine, tiling
from krita_sdxl.backend.setup.plan import VERSION

from . import demo as demo_cmd
from . import setup as setup_cmd
from .connection import connect
from .job_options import add_job_flags
from .options import add_client_flags, add_common, add_settings, resolve
from .refine import cmd_refine, say

log = logging.getLogger("krita_sdxl")

EXIT_STATUSES = """exit status:
  0    done
  1    the job failed, or the service could not be reached (the message says which)
  2    a bad flag, setting, file name, picture or model: nothing was run
  3    the job was lost: the service restarted (or dropped it) while it ran; run the command again
  130  interrupted (Ctrl-C); a running job is cancelled on the service
"""
EPILOG = f"""examples:
  krita-sdxl demo -o refined.png               everything offline: demo service, sample picture, refined.png
  krita-sdxl serve --demo                      tiny offline demo model, on tcp://127.0.0.1:5588
  krita-sdxl serve                             the SDXL refiner from the local Hugging Face cache
  krita-sdxl serve --model /models/refiner     a diffusers folder (or a .safetensors checkpoint)
  krita-sdxl refine in.png --prompt "oil painting" --strength 0.3 -o out.png
  krita-sdxl refine in.png --local --demo -o out.png      no service: run the pipeline here
  krita-sdxl info
  krita-sdxl setup                             check PyTorch's build for this machine, download the refiner

{EXIT_STATUSES}"""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        if message.endswith("expected one argument") and message.startswith("argument --"):
            flag = message.split()[1].rstrip(":").split("/")[-1]
            message += f" (a value that starts with a dash goes after an equals sign: {flag}=-VALUE)"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = Parser(
        prog="krita-sdxl",
        description="SDXL refiner service for Krita, and its command-line client.",
        epilog=EPILOG,
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"krita-sdxl {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = Parser(add_help=False)
    add_common(common)

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run the service until Ctrl-C or SIGTERM",
        description="Check the address, load the model once and serve jobs over ZeroMQ.",
    )
    add_settings(serve, "serve")

    refine = sub.add_parser(
        "refine",
        parents=[common],
        help="refine one picture through a running service (or --local)",
        description="Refine a picture file with the SDXL refiner. 8-bit, 16-bit and float pictures are "
        "refined and written at their own depth; grey ones come back grey.",
        epilog=EXIT_STATUSES,
        formatter_class=raw,
    )
    refine.add_argument("input", type=Path, help="the picture (PNG, TIFF, JPEG, WebP, ...)")
    refine.add_argument(
        "-o",
        "--output",
        required=True,
        help="where to write the result; its extension picks the format (.png keeps 16-bit, .tif float; "
        "a missing folder is created)",
    )
    refine.add_argument("--local", action="store_true", help="run the pipeline in this process, no service")
    add_client_flags(refine, timeout=30.0)
    add_job_flags(refine)
    add_settings(refine, "refine")

    demo_cmd.add_parser(sub, common)

    keys = sub.add_parser(
        "keys",
        parents=[common],
        help="write a CURVE key pair (for a service beyond this machine)",
        description="Write NAME.key (public: give it to the other side) and NAME.key_secret (private, mode 0600).",
    )
    keys.add_argument("--dir", type=Path, default=Path("."), help="where to write them (default: here)")
    keys.add_argument("--name", default="server", help="file name stem (default: server)")
    keys.add_argument("--force", action="store_true", help="replace an existing key pair of that name")

    authorize = sub.add_parser(
        "authorize",
        parents=[common],
        help="allow a client's public key (CURVE)",
        description="Write a client's public key (as the Krita docker shows it) into the service's authorized "
        "keys folder; a running service picks it up at once.",
    )
    authorize.add_argument("public_key", help="the client's 40-character public key, or its .key file")
    authorize.add_argument("--dir", type=Path, required=True, help="the folder given to serve --authorized-keys")
    authorize.add_argument("--name", help="file name stem (default: client- and the key's first 16 hex digits)")
    authorize.add_argument("--force", action="store_true", help="replace another key stored under --name")

    info = sub.add_parser(
        "info",
        parents=[common],
        help="print a running service's capabilities",
        description="Ask a running service what it runs: device, models, modes, limits.",
    )
    add_client_flags(info, timeout=5.0)
    info.add_argument("--json", action="store_true", help="machine-readable output")

    setup_cmd.add_parser(sub, common)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return resolve(args)


_tiling = tiling


def cmd_serve(args: argparse.Namespace) -> int:
    import zmq

    from krita_sdxl.backend.pool.plan import check_pool
    from krita_sdxl.backend.service.limits import Limits
    from krita_sdxl.backend.service.security import SecurityError
    from krita_sdxl.backend.service.server import Service
    from krita_sdxl.protocol.endpoint import parse_endpoint

    from .preflight import bind_problem, check_serve

    settings = resolve(args)
    configure_logging(settings.log_level)
    check_pool(settings)  # the pool settings fit together, Ray Serve is installed
    signal.signal(signal.SIGTERM, _interrupt)  # while starting: stop what was started (a local Ray), then exit
    curve = check_serve(settings)  # endpoint, exposure, keys, a test bind, device, checkpoint: before the load
    pool = None
    if settings.pool == "ray":  # the same service; the jobs run on Ray Serve replicas (backend/pool)
        from krita_sdxl.backend.pool.cluster import start_pool

        say("starting the pool (Ray Serve) ...")
        pool = start_pool(settings)
        engine = pool.engine
    elif settings.identity:
        from krita_sdxl.backend.engine.identity import IdentityEngine

        engine = IdentityEngine()
    else:
        tiles = tiling(settings)
        say(f"loading {'the demo model' if settings.demo else settings.model} ...")
        engine = load_engine(settings)
        engine.tiling = tiles
    limits = Limits(
        max_pixels=settings.max_pixels,
        max_prompt_chars=settings.max_prompt_chars,
        max_jobs_per_client=settings.max_jobs_per_client,
        max_jobs_total=settings.max_queue,
        max_connections=settings.max_connections,
        result_ttl=settings.result_ttl,
    )
    try:
        service = Service(
            engine,
            settings.endpoint,
            limits=limits,
            heartbeat_timeout=settings.heartbeat_timeout,
            curve=curve,
            insecure=settings.insecure,
            warm_up=settings.warmup,
            worker=pool.dispatcher if pool is not None else None,
            admin_keys=Path(settings.admin_keys).expanduser() if settings.admin_keys else None,
        )
    except SecurityError as exc:
        raise ConfigError(str(exc)) from None
    except zmq.ZMQError as exc:  # the address was taken while the model loaded
        raise ConfigError(bind_problem(parse_endpoint(settings.endpoint, bind=True), exc)) from None
    finally:
        if pool is not None and "service" not in locals():
            pool.close()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: service.stop())
    if pool is not None:  # Ray gone under the service: its clients hear why, then it exits non-zero
        pool.watch(lambda why: service.fail(f"the GPU pool failed: {why}; the service stops (submit again once "
                                            "it is back)"))  # fmt: skip
    caps = engine.describe()
    log.info(
        "device %s, dtype %s, model %s",
        caps.get("device"),
        caps.get("dtype"),
        ", ".join(m.get("name", "?") for m in caps.get("models", [])),
    )
    if pool is not None:
        log.info("pool %s: %s", pool.name, pool.plan.describe())
    print(f"krita-sdxl ready on {service.endpoint}", flush=True)
    try:
        service.serve_forever()
    finally:
        if pool is not None:
            pool.close()
    if service.failure is not None:  # exit now: Ray's exit hooks would wait for the Ray that is gone
        say(f"krita-sdxl serve: error: {service.failure}")
        logging.shutdown()
        os._exit(EXIT_FAILED)
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_info(args: argparse.Namespace) -> int:
    from .client import JobFailed, ServiceUnavailable

    client = connect(args)
    with client:
        try:
            welcome = client.hello()
        except (ServiceUnavailable, JobFailed) as exc:
            raise CommandFailed(str(exc)) from None
    if args.json:
        print(json.dumps(welcome, indent=2, default=str))
        return 0
    caps = welcome["capabilities"]
    print(f"service     {welcome['server']} at {client.endpoint}")
    print(f"protocol    {caps.get('protocol_version')}")
    print(f"device      {caps.get('device')}" + (f" ({caps['gpu']})" if caps.get("gpu") else ""))
    print(f"dtype       {caps.get('dtype')}" + (f", VAE {caps['vae_dtype']}" if caps.get("vae_dtype") else ""))
    total, free = caps.get("gpu_memory_total"), caps.get("gpu_memory_free")
    if total:
        print(f"GPU memory  {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    for m in caps.get("models", []):
        state = "" if "loaded" not in m else (", loaded" if m["loaded"] else ", not loaded")
        print(f"model       {m.get('role')}: {m.get('name')}" + (f" ({m['path']}{state})" if m.get("path") else ""))
    print(f"modes       {', '.join(caps.get('modes', []))}")
    limits = caps.get("limits") or {}
    if limits:
        print(f"limits      pictures up to {limits.get('max_pixels'):,} pixels, prompts up to "
              f"{limits.get('max_prompt_chars'):,} characters")  # fmt: skip
    memory = caps.get("memory") or {}
    if memory:
        print(f"memory      {memory.get('mode')}" + (f" (auto: {memory['reason']})" if memory.get("reason") else ""))
    if caps.get("watermark"):
        print(f"watermark   {caps['watermark']}")
    speed = caps.get("speed") or {}
    if speed.get("requested") or speed.get("enabled"):
        why = "; ".join(speed.get("level_reasons") or [])
        asked = f" (asked for {speed['requested']}: {why})" if why else ""
        print(f"speed       {speed.get('level', 'compile') if speed.get('enabled') else 'off'}{asked}")
    pool = caps.get("pool") or {}
    if pool:
        print(f"pool        {pool.get('kind')}: {pool.get('replicas')} replicas running, {pool.get('gpus')} GPUs")
        for r in pool.get("replica_states") or []:
            where = f"{r.get('replica')} on {r.get('node')}"
            print(f"  replica   {where}: {r.get('state')}, {r.get('device')}, {r.get('jobs')} jobs")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import zmq.auth

    from krita_sdxl.backend.service.security import SecurityError, write_keys

    try:
        public, secret = write_keys(args.dir, args.name, force=args.force)
    except (SecurityError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    from krita_sdxl.protocol.authorize import authorize_command

    key = zmq.auth.load_certificate(str(public))[0].decode("ascii")
    print(f"public key: {public}   (give this file, or the key {shlex.quote(key)}, to the other side)")
    print(f"secret key: {secret}   (keep it private)")
    print(f"a service admits this key with: {authorize_command(key)}")
    return 0


def cmd_authorize(args: argparse.Namespace) -> int:
    import zmq.auth

    from krita_sdxl.backend.service.security import SecurityError, authorize_key

    key = args.public_key
    if Path(key).expanduser().is_file():
        try:
            key = zmq.auth.load_certificate(str(Path(key).expanduser()))[0].decode("ascii")
        except (OSError, ValueError):
            raise ConfigError(f"{args.public_key}: no public key in that file") from None
    try:
        path = authorize_key(args.dir, key, args.name, force=args.force)
    except (SecurityError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    print(f"authorized: {path} (takes effect for new connections)")
    return 0


def _printable_names() -> None:
    """A file name that is not valid UTF-8 (kept by Python as lone surrogates) prints escaped, never as a
    UnicodeEncodeError after the work is done."""
    import io

    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


Z85 = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
VALUED = frozenset({"--dir", "--name", "--log-level"})  # authorize's options that take the next word


def _dash_key_last(argv: list[str]) -> list[str]:
    """One Z85 key in 85 starts with ``-`` (``-h...`` even reads as ``-h``): argparse takes it for an option.
    ``authorize``'s key-shaped word that starts with a dash moves behind ``--``, where only a value can be."""
    words = [i for i, word in enumerate(argv) if not word.startswith("-")]
    if not words or argv[words[0]] != "authorize" or "--" in argv:
        return argv
    start = words[0] + 1
    for i in range(start, len(argv)):
        word = argv[i].strip("\"'")
        if word.startswith("-") and len(word) == 40 and set(word) <= Z85 and argv[i - 1] not in VALUED:
            return [*argv[:i], *argv[i + 1 :], "--", argv[i]]
    return argv


def main(argv: list[str] | None = None) -> int:
    _printable_names()
    args = build_parser().parse_args(_dash_key_last(sys.argv[1:] if argv is None else list(argv)))
    configure_logging(args.log_level or ("info" if args.command == "serve" else "warning"))
    commands = {
        "serve": cmd_serve,
        "refine": cmd_refine,
        "info": cmd_info,
        "demo": demo_cmd.run_demo,
        "keys": cmd_keys,
        "authorize": cmd_authorize,
        "setup": setup_cmd.run,
    }
    prog = f"krita-sdxl {args.command}"
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        say(f"{prog}: error: {exc}")
        return EXIT_USAGE
    except CommandFailed as exc:
        say(f"{prog}: {exc}" if exc.code == EXIT_INTERRUPTED else f"{prog}: error: {exc}")
        return exc.code
    except KeyboardInterrupt:
        say(f"{prog}: interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
