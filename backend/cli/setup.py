"""``krita-sdxl setup``: make this machine ready to serve, from a terminal (headless machines too).

    krita-sdxl setup [--base] [--fix-torch]     check PyTorch's build, download the models, say how to start
    krita-sdxl setup download [--json-progress] the models only (the Krita plugin runs this, reading JSON lines)
    krita-sdxl setup check [--json]             this environment: versions, PyTorch's device (the plugin's check)

The decisions (which PyTorch build, which files, enough disk?) are the plugin's too: ``setup.plan``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from importlib import metadata
from typing import Any

from krita_sdxl.backend.common.config import EXIT_FAILED, EXIT_OK
from krita_sdxl.backend.setup.plan import VERSION, events, hub, machine, torch_builds
from krita_sdxl.backend.setup.plan.space import human

from . import setup_upscaler as upscaler_cmd

TORCH_INDEX_ENV = "KRITA_SDXL_TORCH_INDEX"  # "pip": pip's own configuration; or an index URL


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    setup = sub.add_parser(
        "setup",
        parents=[common],
        help="make this machine ready: PyTorch's build, the models (download), how to start",
        description="Check that this Python's PyTorch is the build this machine wants (CUDA from nvidia-smi, "
        "ROCm, Apple MPS or CPU), download the SDXL refiner (and with --base the base) into the Hugging Face "
        "cache, resumable and verified, and print how to start the service. The Krita plugin's Set up button "
        "makes its own environment and runs the same steps.",
        epilog="steps (what the Krita plugin runs):\n"
        "  krita-sdxl setup download [--base] [--verify] [--json-progress]\n"
        "  krita-sdxl setup check [--json]\n"
        "  krita-sdxl setup upscaler [--dir DIR] [--json-progress]   (the docker's Download upscaler)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _download_flags(setup)
    setup.add_argument("--torch", choices=torch_builds.BUILDS, default="auto",
                       help="the PyTorch build to want (default: auto, from this machine's GPU)")  # fmt: skip
    setup.add_argument(
        "--torch-index",
        metavar="URL",
        default=os.environ.get(TORCH_INDEX_ENV) or None,
        help="where pip gets PyTorch: an index URL, or 'pip' for pip's own configuration (default: "
        f"${TORCH_INDEX_ENV}, else download.pytorch.org for the build)",
    )
    setup.add_argument("--fix-torch", action="store_true", help="install the wanted PyTorch build into this Python")
    setup.add_argument("--no-download", action="store_true", help="check only; download nothing")
    steps = setup.add_subparsers(dest="setup_step", metavar="STEP")
    download = steps.add_parser("download", parents=[common], help="download the models only")
    _download_flags(download, argparse.SUPPRESS)
    download.add_argument("--json-progress", action="store_true", help="progress as JSON lines (for the plugin)")
    check = steps.add_parser("check", parents=[common], help="print what this environment runs")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    upscaler_cmd.add_parser(steps, common)


def _download_flags(parser: argparse.ArgumentParser, default: Any = False) -> None:
    parser.add_argument(
        "--base",
        action="store_true",
        default=default,
        help=f"also the SDXL base (Generate and Two-stage modes, about {human(hub.BASE.approx_bytes)})",
    )
    parser.add_argument("--verify", action="store_true", default=default,
                        help="also check the checksums of the files already downloaded")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    step = getattr(args, "setup_step", None)
    if step == "check":
        return cmd_check(args)
    if step == "download":
        return cmd_download(args)
    if step == "upscaler":
        return upscaler_cmd.run(args, _json_emit if args.json_progress else _TextProgress())
    return cmd_setup(args)


def _repos(args: argparse.Namespace) -> list[str]:
    return [m.repo for m in hub.models(bool(getattr(args, "base", False)))]


# --- setup check ------------------------------------------------------------------------------------


def check_info() -> dict[str, Any]:
    """Versions and PyTorch's device in this environment; ``problems`` lists what is wrong."""
    info: dict[str, Any] = {"backend_version": VERSION, "python": sys.version.split()[0],
                            "executable": sys.executable, "problems": []}  # fmt: skip
    try:
        import torch

        from krita_sdxl.backend.models.refiner import pick_device

        info.update(torch=torch.__version__, cuda=torch.version.cuda, device=pick_device("auto"))
    except Exception as exc:
        info["problems"].append(f"PyTorch does not import: {type(exc).__name__}: {exc}")
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception as exc:
        info["problems"].append(f"diffusers does not import: {type(exc).__name__}: {exc}")
    return info


def cmd_check(args: argparse.Namespace) -> int:
    info = check_info()
    if args.json:
        print(json.dumps(info), flush=True)
    else:
        for key in ("backend_version", "python", "executable", "torch", "cuda", "device", "diffusers"):
            if info.get(key) is not None:
                print(f"{key:16}{info[key]}")
        for problem in info["problems"]:
            print(f"problem         {problem}")
    return EXIT_FAILED if info["problems"] else EXIT_OK


# --- setup download ---------------------------------------------------------------------------------


def cmd_download(args: argparse.Namespace) -> int:
    from krita_sdxl.backend.setup.download import DownloadFailed, download

    emit = _json_emit if args.json_progress else _TextProgress()
    try:
        download(_repos(args), emit, verify_all=bool(args.verify))
    except DownloadFailed as exc:
        if args.json_progress:
            _json_emit("error", why=exc.why, what=exc.what)
        else:
            emit.close()
            print(f"krita-sdxl setup: error: {exc.why} {exc.what}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json_progress:
        emit.close()
    return EXIT_OK


def _json_emit(kind: str, **fields: Any) -> None:
    print(events.line(kind, **fields), flush=True)


class _TextProgress:
    """The download as a terminal progress bar in bytes."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.shown = 0

    def __call__(self, kind: str, **fields: Any) -> None:
        from krita_sdxl.backend.setup.download import describe_plan

        if kind == "plan":
            print(describe_plan({"event": kind, **fields}), flush=True)
            if fields["needed"]:
                from tqdm import tqdm

                self.bar = tqdm(total=fields["needed"], unit="B", unit_scale=True, unit_divisor=1000, leave=True)
        elif kind == "progress" and self.bar is not None:
            self.bar.update(fields["done"] - self.shown)
            self.shown = fields["done"]
        elif kind == "file" and self.bar is not None:
            self.bar.set_description(fields["name"].rsplit("/", 1)[-1][:30])
        elif kind == "done":
            from krita_sdxl.backend.setup.download import describe_check

            self.close()
            print(f"{fields['repo']}: {describe_check(fields)}, in {fields['snapshot']}", flush=True)

    def error(self, why: str, what: str) -> None:
        self.close()
        print(f"krita-sdxl setup: error: {why} {what}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --- setup (terminal) -------------------------------------------------------------------------------


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cmd_setup(args: argparse.Namespace) -> int:
    facts = machine.gather()
    print(f"this machine    {facts.summary}")
    try:
        redo = "run `krita-sdxl setup --fix-torch`"  # the docker's warning says "click Repair"
        choice = torch_builds.choose_torch(facts, args.torch, args.torch_index, redo=redo)
    except torch_builds.SetupProblem as exc:
        print(f"krita-sdxl setup: error: {exc.why} {exc.what}", file=sys.stderr)
        return EXIT_FAILED
    ok, note = torch_builds.fits(_installed("torch"), choice, facts.system)
    print(f"PyTorch         {note}")
    if choice.warning:
        print(f"warning         {choice.warning}")
    fix = [sys.executable, "-m", "pip", "install", *choice.pip_args]
    if not ok and args.fix_torch:
        print(f"installing      {shlex.join(fix)}", flush=True)
        if subprocess.run(fix).returncode != 0:
            print("krita-sdxl setup: error: pip could not install PyTorch (its output is above)", file=sys.stderr)
            return EXIT_FAILED
        ok, note = torch_builds.fits(_installed("torch"), choice, facts.system)
        print(f"PyTorch         {note}")
    status = EXIT_OK
    if args.no_download:
        cache = hub.hf_cache_dir()
        for model in hub.models(args.base):
            there = hub.snapshot_ready(cache, model.repo)
            command = "krita-sdxl setup --base" if args.base else "krita-sdxl setup"
            print(f"model           {model.repo}: " + ("in the cache" if there else
                  f"not in {cache} (about {human(model.approx_bytes)} to download: {command})"))  # fmt: skip
            status = status if there else EXIT_FAILED
    else:
        status = cmd_download(argparse.Namespace(base=args.base, verify=args.verify, json_progress=False))
    if not ok:
        print(f"to fix PyTorch  {shlex.join(fix)}   (or: krita-sdxl setup --fix-torch)")
        status = EXIT_FAILED
    if status == EXIT_OK:
        print("ready           start the service: krita-sdxl serve   (for other computers: see the README's remote "
              "backend section; in Krita: ⚙ → Command: krita-sdxl)")  # fmt: skip
    return status
