"""``krita-sdxl setup upscaler``: download an upscaler model file (Real-ESRGAN x4plus unless told another by
URL, size and SHA-256), resumable and verified, into a folder; prints how to serve with it. The docker's
Download button runs this in the backend's Python, reading ``--json-progress`` lines."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

from krita_sdxl.backend.common.config import EXIT_FAILED, EXIT_OK, ConfigError
from krita_sdxl.backend.setup.plan import upscalers
from krita_sdxl.backend.setup.plan.space import human

DEFAULT = upscalers.DEFAULT


def add_parser(steps: Any, common: argparse.ArgumentParser) -> None:
    p = steps.add_parser(
        "upscaler",
        parents=[common],
        help=f"download an upscaler model ({DEFAULT.title}, {human(DEFAULT.size)}) for upscale jobs",
        description=f"Download {DEFAULT.title} ({DEFAULT.licence}, {human(DEFAULT.size)}) from {DEFAULT.url}, "
        "continuing a broken download and checking its SHA-256, then serve with --upscaler FILE.",
    )
    p.add_argument("--dir", type=Path, default=Path("."), help="the folder to put it in (default: here)")
    p.add_argument("--json-progress", action="store_true", help="progress as JSON lines (for the plugin)")
    other = p.add_argument_group("another file (all four together)")
    other.add_argument("--url", help="where to fetch it")
    other.add_argument("--name", help="the file name to save it as (.pth or .safetensors)")
    other.add_argument("--size", type=int, help="its size in bytes")
    other.add_argument("--sha256", help="its published SHA-256")


def chosen(args: argparse.Namespace) -> upscalers.UpscalerFile:
    given = {k: getattr(args, k) for k in ("url", "name", "size", "sha256")}
    if all(v is None for v in given.values()):
        return DEFAULT
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if missing:
        raise ConfigError(
            f"another upscaler file needs --url, --name, --size and --sha256 together; missing {', '.join(missing)}"
        )
    if not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
        raise ConfigError(f"--sha256 must be 64 hexadecimal digits, got {args.sha256!r}")
    if args.size < 1:
        raise ConfigError(f"--size must be a number of bytes above 0, got {args.size}")
    name = Path(args.name).name
    if name != args.name or not name.lower().endswith((".pth", ".safetensors")):
        raise ConfigError(f"--name must be a file name ending in .pth or .safetensors, got {args.name!r}")
    if not re.match(r"^https?://", args.url):
        raise ConfigError(f"--url must be an http(s) address, got {args.url!r}")
    return upscalers.UpscalerFile(name, name, args.url, args.size, args.sha256.lower(), "")


def run(args: argparse.Namespace, emit: Any) -> int:
    from krita_sdxl.backend.setup.download import DownloadFailed
    from krita_sdxl.backend.setup.upscaler import download_upscaler

    file = chosen(args)
    try:
        path = download_upscaler(file, args.dir.expanduser().resolve(), emit)
    except DownloadFailed as exc:
        if args.json_progress:
            emit("error", why=exc.why, what=exc.what)
        else:
            emit.error(exc.why, exc.what)
        return EXIT_FAILED
    if not args.json_progress:
        emit.close()
        print(f"serve with it: krita-sdxl serve --upscaler {shlex.quote(str(path))}")
    return EXIT_OK
