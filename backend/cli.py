"""Command line: ``krita-sdxl serve | refine | info``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import demo_cmd
from .client import DEFAULT_ENDPOINT

log = logging.getLogger("krita_sdxl")

EPILOG = """examples:
  krita-sdxl demo                              everything offline: demo service, sample picture, refined.png
  krita-sdxl serve --demo                      tiny offline demo model, on tcp://127.0.0.1:5588
  krita-sdxl serve                             the SDXL refiner from the local Hugging Face cache
  krita-sdxl serve --model /models/refiner     a diffusers folder
  krita-sdxl refine in.png --prompt "oil painting" --strength 0.3 -o out.png
  krita-sdxl refine in.png --local --demo -o out.png      no service: run the pipeline here
  krita-sdxl info
"""


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and device")
    g.add_argument(
        "--model",
        help="the refiner: a Hugging Face repo id (from the local cache), a diffusers folder or a single-file "
        ".safetensors checkpoint (default: stabilityai/stable-diffusion-xl-refiner-1.0)",
    )
    g.add_argument(
        "--base-model",
        help="the base model for the generate and two_stage modes, same kinds as --model; loaded with the first "
        "job that needs it (default: stabilityai/stable-diffusion-xl-base-1.0 if it is in the local cache; "
        "'none': no base)",
    )
    g.add_argument(
        "--model-config",
        metavar="DIR",
        help="diffusers config folder for a single-file --model (default: the shipped SDXL 1.0 refiner configs)",
    )
    g.add_argument(
        "--base-model-config",
        metavar="DIR",
        help="diffusers config folder for a single-file --base-model (default: the shipped SDXL 1.0 base configs)",
    )
    g.add_argument(
        "--memory",
        choices=["auto", "none", "balanced", "model", "sequential"],
        help="where weights live: none = all on the GPU; balanced = UNets on the GPU, text encoders and VAE "
        "only while used; model = each model on the GPU only while it runs; sequential = layer by layer "
        "(least memory, slowest); auto = chosen from the free GPU memory (default). The offload modes need a GPU",
    )
    g.add_argument(
        "--oom-retry",
        action="store_true",
        default=None,
        help="when a job runs out of GPU memory, run it once more in the next lower memory mode",
    )
    g.add_argument(
        "--no-watermark",
        dest="watermark",
        action="store_false",
        default=None,
        help="do not apply the invisible SDXL watermark (applied when invisible-watermark is installed)",
    )
    g.add_argument("--simulate-oom", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument(
        "--demo",
        action="store_true",
        default=None,
        help="use the tiny random-weight demo model (offline; its pixels are meaningless)",
    )
    g.add_argument(
        "--allow-download",
        action="store_true",
        default=None,
        help="download the model from the Hugging Face Hub if it is not cached",
    )
    g.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], help="default: auto (cuda, mps, cpu)")
    g.add_argument(
        "--dtype",
        choices=["auto", "fp16", "bf16", "fp32"],
        help="UNet/text-encoder precision (default: auto = fp16 on GPUs, fp32 on CPU)",
    )
    g.add_argument("--cache-dir", help="where the demo model is built (default: ~/.cache/krita-sdxl)")
    g.add_argument(
        "--speed",
        choices=["auto", "on", "off"],
        help="compiled speed path: torch.compile of the UNet's and the VAE's blocks, one compilation for every "
        "size; auto = on with CUDA. Default: off (on an H100 it saves up to 0.3 s a job, and costs 2.5 min of "
        "compiling at the first start, 26 s at later ones). serve compiles it in a warm-up job at start-up "
        "(clients can connect meanwhile) and keeps the kernels in --compile-cache",
    )
    g.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        default=None,
        help="serve: do not compile the speed path at start-up (then the first job compiles)",
    )
    g.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="where compiled kernels are kept for fast restarts (default: CACHE_DIR/torch-compile)",
    )
    g.add_argument(
        "--config",
        help="TOML settings file with a [serve] table (default: ~/.config/krita-sdxl/config.toml if it exists)",
    )


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job")
    g.add_argument("--prompt", default="", help="what the refined image shows")
    g.add_argument("--negative-prompt", default="", help="what it should not show")
    g.add_argument("--strength", type=float, default=0.3, help="how much to change, 0 < s <= 1 (default 0.3)")
    g.add_argument("--steps", type=int, default=50, help="scheduler steps; strength x steps run (default 50)")
    g.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    g.add_argument("--seed", type=int, default=None, help="random when not given; the used seed is printed")
    g.add_argument("--aesthetic-score", type=float, default=6.0)
    g.add_argument("--negative-aesthetic-score", type=float, default=2.5)
    g.add_argument("--work-size", metavar="WxH", help="run the model at this size and scale back")
    g.add_argument(
        "--mode",
        choices=["refine", "generate", "two_stage"],
        default="refine",
        help="refine (the refiner alone), generate (base then refiner; strength 1 = from noise) or two_stage "
        "(base picture, then refiner img2img at --strength); the last two need a base model",
    )
    g.add_argument(
        "--denoising-end",
        type=float,
        default=0.8,
        help="generate: the fraction of the schedule the base runs (default 0.8)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="krita-sdxl",
        description="SDXL refiner service for Krita, and its command-line client.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=None, help="default: info"
    )

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run the service until Ctrl-C or SIGTERM",
        description="Load the model once and serve jobs over ZeroMQ.",
    )
    serve.add_argument(
        "--endpoint",
        help=f"where to listen (default {DEFAULT_ENDPOINT}; ipc://PATH also works; port * picks a free one)",
    )
    lim = serve.add_argument_group("limits")
    lim.add_argument("--max-queue", type=int, help="most jobs queued or running, all clients (default 1000)")
    lim.add_argument("--max-jobs-per-client", type=int, help="most jobs queued or running per client (default 32)")
    lim.add_argument("--max-pixels", type=int, help="largest image in pixels (default 8192x8192)")
    lim.add_argument("--max-prompt-chars", type=int, help="longest prompt (default 4000)")
    lim.add_argument(
        "--heartbeat-timeout",
        type=float,
        help="seconds of silence after which a client's jobs are cancelled (default 10)",
    )
    sec = serve.add_argument_group("security (needed to listen beyond loopback)")
    sec.add_argument("--curve-secret-key", help="the service's CURVE secret key file (krita-sdxl keys --name server)")
    sec.add_argument("--authorized-keys", help="folder with the public .key file of every client allowed in")
    sec.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="listen on a non-loopback address without authentication (not recommended)",
    )
    tiles = serve.add_argument_group("large images (refined at native size in overlapping tiles)")
    tiles.add_argument(
        "--tile-threshold",
        type=_pixel_count,
        metavar="PIXELS",
        help="tile images larger than this many pixels, or WxH (default 2048x2048; 0 = never tile)",
    )
    tiles.add_argument("--tile-size", type=int, metavar="PX", help="tile side, a multiple of 8 (default 1024)")
    tiles.add_argument("--tile-overlap", type=int, metavar="PX", help="pixels neighbouring tiles share (default 128)")
    serve.add_argument("--identity", action="store_true", default=None, help=argparse.SUPPRESS)
    _add_model_flags(serve)

    refine = sub.add_parser(
        "refine",
        parents=[common],
        help="refine one image through a running service (or --local)",
        description="Refine an image file with the SDXL refiner.",
    )
    refine.add_argument("input", type=Path, help="image file (PNG, JPEG, ...)")
    refine.add_argument("-o", "--output", type=Path, required=True, help="where to write the result (PNG)")
    refine.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"service address (default {DEFAULT_ENDPOINT})")
    refine.add_argument("--timeout", type=float, default=60.0, help="seconds to wait between two events")
    refine.add_argument("--local", action="store_true", help="run the pipeline in this process, no service")
    _add_job_flags(refine)
    _add_model_flags(refine)

    demo_cmd.add_parser(sub, common)

    keys = sub.add_parser(
        "keys",
        parents=[common],
        help="write a CURVE key pair (for non-loopback use)",
        description="Write NAME.key (public: give it to the other side) and NAME.key_secret.",
    )
    keys.add_argument("--dir", type=Path, default=Path("."), help="where to write them (default: here)")
    keys.add_argument("--name", default="server", help="file name stem (default: server)")

    authorize = sub.add_parser(
        "authorize",
        parents=[common],
        help="allow a client's public key (CURVE)",
        description="Write a client's public key (as the Krita docker shows it) into the "
        "service's authorized keys folder.",
    )
    authorize.add_argument("public_key", help="the client's 40-character public key")
    authorize.add_argument("--dir", type=Path, required=True, help="the folder given to serve --authorized-keys")
    authorize.add_argument("--name", default="krita", help="file name stem (default: krita)")

    info = sub.add_parser("info", parents=[common], help="print a running service's capabilities")
    info.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    info.add_argument("--timeout", type=float, default=5.0)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _settings(args: argparse.Namespace):
    from .config import resolve

    keys = (
        "endpoint",
        "model",
        "demo",
        "allow_download",
        "device",
        "dtype",
        "cache_dir",
        "log_level",
        "max_queue",
        "max_jobs_per_client",
        "max_pixels",
        "max_prompt_chars",
        "heartbeat_timeout",
        "curve_secret_key",
        "authorized_keys",
        "insecure",
        "identity",
        "tile_threshold",
        "tile_size",
        "tile_overlap",
        "speed",
        "warmup",
        "compile_cache",
        "base_model",
        "model_config",
        "base_model_config",
        "memory",
        "oom_retry",
        "watermark",
        "simulate_oom",
    )
    flags = {k: getattr(args, k, None) for k in keys}
    if args.command != "serve":
        flags.pop("endpoint")
    return resolve(getattr(args, "config", None), flags)


def _pixel_count(text: str) -> int:
    """A pixel count given as 4194304 or as 2048x2048."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 0:
        raise argparse.ArgumentTypeError(f"expected a pixel count such as 4194304 or 2048x2048, got {text!r}")
    return parts[0] * parts[-1] if len(parts) == 2 else parts[0]


def _tiling(settings):
    """The engine's tiling settings (backend/tiling.py); ConfigError when they do not fit together."""
    from .config import ConfigError
    from .tiling import TilingConfig

    try:
        return TilingConfig(threshold=settings.tile_threshold, tile=settings.tile_size, overlap=settings.tile_overlap)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _load_engine(settings):
    from .config import ConfigError
    from .engine import Engine
    from .memory import MemoryModeError
    from .models import ModelNotFound

    try:
        return Engine.load(
            model=None if settings.demo else settings.model,
            demo=settings.demo,
            allow_download=settings.allow_download,
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.cache_path,
            speed=settings.speed,
            compile_cache=Path(settings.compile_cache).expanduser() if settings.compile_cache else None,
            base_model=settings.base_model or None,
            model_config=settings.model_config or None,
            base_model_config=settings.base_model_config or None,
            memory=settings.memory,
            watermark=settings.watermark,
            oom_retry=settings.oom_retry,
            simulate_oom=settings.simulate_oom,
        )
    except (ModelNotFound, MemoryModeError) as exc:  # reported like a bad setting: a message, exit status 2
        raise ConfigError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .limits import Limits
    from .security import CurveConfig, SecurityError
    from .server import Service

    settings = _settings(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.identity:
        from .identity_engine import IdentityEngine

        engine = IdentityEngine()
    else:
        tiling = _tiling(settings)  # a bad tile setting fails before the model loads
        engine = _load_engine(settings)
        engine.tiling = tiling
    limits = Limits(
        max_pixels=settings.max_pixels,
        max_prompt_chars=settings.max_prompt_chars,
        max_jobs_per_client=settings.max_jobs_per_client,
        max_jobs_total=settings.max_queue,
    )
    curve = None
    if settings.curve_secret_key or settings.authorized_keys:
        if not (settings.curve_secret_key and settings.authorized_keys):
            raise ConfigError("CURVE needs both --curve-secret-key and --authorized-keys")
        curve = CurveConfig(Path(settings.curve_secret_key), Path(settings.authorized_keys))
    try:
        service = Service(
            engine,
            settings.endpoint,
            limits=limits,
            heartbeat_timeout=settings.heartbeat_timeout,
            curve=curve,
            insecure=settings.insecure,
            warm_up=settings.warmup,
        )
    except SecurityError as exc:
        raise ConfigError(str(exc)) from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: service.stop())
    caps = engine.describe()
    log.info(
        "device %s, dtype %s, model %s",
        caps.get("device"),
        caps.get("dtype"),
        ", ".join(m.get("name", "?") for m in caps.get("models", [])),
    )
    print(f"krita-sdxl ready on {service.endpoint}", flush=True)
    service.serve_forever()
    return 0


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: --work-size must look like 1024x768, got {text!r}") from None
    return w, h


def _read_image(path: Path):
    from PIL import Image as PILImage

    from krita_sdxl.protocol import Image, ImageSpec

    try:
        with PILImage.open(path) as im:
            rgba = im.convert("RGBA")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read {path}: {exc}") from None
    return Image(ImageSpec(rgba.width, rgba.height, "RGBA", 8), rgba.tobytes())


def _write_image(path: Path, img) -> None:
    from PIL import Image as PILImage

    spec = img.spec
    PILImage.frombuffer("RGBA", (spec.width, spec.height), bytes(img.data), "raw", "RGBA", 0, 1).save(path)


def _job_params(args: argparse.Namespace) -> dict[str, Any]:
    work = _parse_size(args.work_size)
    return dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        strength=args.strength,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        aesthetic_score=args.aesthetic_score,
        negative_aesthetic_score=args.negative_aesthetic_score,
        work_width=work[0] if work else None,
        work_height=work[1] if work else None,
        mode=args.mode,
        denoising_end=args.denoising_end,
    )


def cmd_refine(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from krita_sdxl.protocol import ProtocolError

    image = _read_image(args.input)
    params = _job_params(args)
    bar = tqdm(total=0, unit="step", desc="refine", leave=False)
    t0 = time.perf_counter()
    try:
        if args.local:
            result, seed = _refine_local(args, image, params, bar)
        else:
            result, seed = _refine_remote(args, image, params, bar)
    except ProtocolError as err:
        raise SystemExit(f"error: {err.message}" + (f" (field {err.field})" if err.field else "")) from None
    finally:
        bar.close()
    _write_image(args.output, result)
    print(
        f"wrote {args.output} ({result.spec.width}x{result.spec.height}, seed {seed}, {time.perf_counter() - t0:.2f} s)"
    )
    return 0


def _refine_remote(args, image, params, bar):
    from .client import JobFailed, ServiceClient, ServiceUnavailable

    def on_event(event) -> None:
        if event.type == "accepted":
            bar.reset(total=event["denoise_steps"])
            if event["position"]:
                bar.set_description(f"queued ({event['position']} ahead)")
        elif event.type == "progress":
            bar.set_description("refine")
            bar.total = event["total"]  # tiles x steps when the service tiles a large image
            bar.n = event["step"]
            bar.refresh()

    with ServiceClient(args.endpoint, timeout=args.timeout) as client:
        try:
            done = client.run(image, on_event=on_event, **params)
        except ServiceUnavailable as exc:
            raise SystemExit(f"error: {exc}") from None
        except JobFailed as exc:
            where = f" (field {exc.field})" if exc.field else ""
            raise SystemExit(f"error: {exc.code}: {exc}{where}") from None
    return done.images["image"], done["seed"]


def _refine_local(args, image, params, bar):
    import secrets

    from krita_sdxl.protocol import CLIENT, decode, encode

    from .config import ConfigError
    from .request import RefineRequest

    # Validate exactly as the service does: through the codec.
    msg = decode(CLIENT, encode(CLIENT, "submit", images={"image": image}, job="local", **params))
    seed = msg["seed"] if msg["seed"] is not None else secrets.randbelow(2**32)
    req = RefineRequest.from_message(msg, seed)
    try:
        engine = _load_engine(_settings(args))
        engine.tiling = _tiling(_settings(args))
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    bar.reset(total=req.plan.denoise_steps)

    def on_progress(step: int, total: int, preview) -> None:
        bar.total = total
        bar.n = step
        bar.refresh()

    return engine.refine(req, on_progress, lambda: False), seed


def cmd_info(args: argparse.Namespace) -> int:
    from .client import ServiceClient, ServiceUnavailable

    with ServiceClient(args.endpoint, timeout=args.timeout) as client:
        try:
            welcome = client.hello()
        except ServiceUnavailable as exc:
            raise SystemExit(f"error: {exc}") from None
    if args.json:
        print(json.dumps(welcome, indent=2, default=str))
        return 0
    caps = welcome["capabilities"]
    print(f"service     {welcome['server']} at {args.endpoint}")
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
    memory = caps.get("memory") or {}
    if memory:
        print(f"memory      {memory.get('mode')}" + (f" (auto: {memory['reason']})" if memory.get("reason") else ""))
    if caps.get("watermark"):
        print(f"watermark   {caps['watermark']}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from .security import write_keys

    public, secret = write_keys(args.dir, args.name)
    print(f"public key: {public}   (give this file to the other side)")
    print(f"secret key: {secret}   (keep it private)")
    return 0


def cmd_authorize(args: argparse.Namespace) -> int:
    from .security import SecurityError, authorize_key

    try:
        path = authorize_key(args.dir, args.public_key, args.name)
    except SecurityError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"authorized: {path} (takes effect for new connections)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "info").upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        import zmq

        from .config import ConfigError

        try:
            return cmd_serve(args)
        except ConfigError as exc:
            print(f"krita-sdxl: error: {exc}", file=sys.stderr, flush=True)
            return 2
        except zmq.ZMQError as exc:
            print(
                f"krita-sdxl: error: cannot listen on {args.endpoint or 'the endpoint'}: {exc}",
                file=sys.stderr,
                flush=True,
            )
            return 2
    commands = {
        "refine": cmd_refine,
        "info": cmd_info,
        "demo": demo_cmd.run_demo,
        "keys": cmd_keys,
        "authorize": cmd_authorize,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
