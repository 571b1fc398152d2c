"""The job flags of ``refine`` and ``demo``: one table; defaults and ranges come from the protocol's
``submit`` schema, and a job is checked by the protocol codec before any work starts."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from krita_sdxl.backend.common.config import ConfigError
from krita_sdxl.protocol import CLIENT, Image, ImageSpec, Message, ProtocolError, decode, encode
from krita_sdxl.protocol.schema import CLIENT_MESSAGES
from krita_sdxl.protocol.upscale import limit_problem

from . import upscale_flags

SUBMIT = CLIENT_MESSAGES["submit"]
MODES = ("refine", "generate", "two_stage")  # as backend/engine/stages.py (which needs no torch, but pulls more)


@dataclass(frozen=True)
class JobOption:
    field: str  # the submit field
    flag: str
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


JOB_OPTIONS: tuple[JobOption, ...] = (
    JobOption("prompt", "--prompt", "what the refined image shows", metavar="TEXT"),
    JobOption("negative_prompt", "--negative-prompt", "what it should not show", metavar="TEXT"),
    JobOption("strength", "--strength", "how much to change"),
    JobOption("steps", "--steps", "scheduler steps; strength x steps of them run"),
    JobOption("guidance_scale", "--guidance", "classifier-free guidance scale"),
    JobOption("seed", "--seed", "the random seed; the one used is printed"),
    JobOption("aesthetic_score", "--aesthetic-score", "SDXL refiner conditioning: the score to aim for"),
    JobOption("negative_aesthetic_score", "--negative-aesthetic-score", "SDXL refiner conditioning: to avoid"),
    JobOption(
        "mode",
        "--mode",
        "refine (the refiner alone), generate (base then refiner; strength 1 = from noise) or two_stage (base "
        "picture, then refiner img2img at --strength); the last two need a base model",
        choices=MODES,
    ),
    JobOption("denoising_end", "--denoising-end", "generate: the fraction of the schedule the base runs"),
)


def _number(value: float) -> str:
    return "2^64-1" if value == 2**64 - 1 else f"{value:g}"


def _range(field: Any) -> str:
    if field.lo is None and field.hi is None:
        return ""
    lo = "" if field.lo is None else f"{'>' if field.lo_open else '>='} {_number(field.lo)}"
    hi = "" if field.hi is None else f"<= {_number(field.hi)}"
    return ", " + " and ".join(p for p in (lo, hi) if p)


def add_job_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """The job flags (all of them, or ``names``), with the protocol's defaults."""
    group = parser.add_argument_group("job")
    for opt in JOB_OPTIONS:
        if names is not None and opt.field not in names:
            continue
        field = SUBMIT[opt.field]
        shown = "random" if field.default is None else repr(field.default) if field.kind == "str" else field.default
        group.add_argument(
            opt.flag,
            dest=opt.field,
            type={"str": str, "int": int, "float": float}[field.kind],
            default=field.default,
            choices=opt.choices,
            metavar=opt.metavar,
            help=f"{opt.help} (default: {shown}{_range(field)})",
        )
    if names is None:
        group.add_argument("--work-size", metavar="WxH", help="run the model at this size and scale back")
        upscale_flags.add_flags(group)


def work_size(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--work-size must look like 1024x768, got {text!r}") from None
    return w, h


def job_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The submit fields the flags give (without image and job id)."""
    out = {opt.field: getattr(args, opt.field) for opt in JOB_OPTIONS if hasattr(args, opt.field)}
    if hasattr(args, "work_size"):
        out["work_width"], out["work_height"] = work_size(args.work_size)
    return out


def _flag(field: str) -> str:
    flags = {opt.field: opt.flag for opt in JOB_OPTIONS}
    flags.update(work_width="--work-size", work_height="--work-size", upscale="--upscale")
    return flags.get(field, field)


def _check_text(fields: dict[str, Any]) -> None:
    """Text the terminal passed in another encoding than UTF-8 (Python keeps such bytes as lone surrogates)."""
    for name, value in fields.items():
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(value[exc.start])
            what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
            raise ConfigError(
                f"{_flag(name)}: not valid UTF-8 text ({what} at character {exc.start + 1}); "
                "set the terminal to UTF-8 or retype it"
            ) from None


def check_fields(spec: ImageSpec, fields: dict[str, Any]) -> None:
    """Check the job's fields as the service will, before the picture is decoded: with a tiny frame of the
    picture's format in its place (no submit field depends on the image's size)."""
    tiny = ImageSpec(8, 8, spec.order, spec.depth, spec.sample)
    check_job(Image(tiny, bytes(tiny.byte_length)), fields)


def check_limits(spec: ImageSpec, fields: dict[str, Any], limits: dict[str, Any], name: str) -> None:
    """The service's limits (``welcome.capabilities.limits``) on the picture ``name`` (its size from the
    header), the work size and the prompts: ConfigError before any pixel is decoded or sent."""
    most = limits.get("max_pixels")
    if isinstance(most, int):
        side = math.isqrt(most)
        most_text = f"{most} ({side}x{side})" if side * side == most else str(most)
        pixels = spec.width * spec.height
        if pixels > most:
            raise ConfigError(
                f"{name} is {spec.width}x{spec.height} = {pixels} pixels; this service accepts at most "
                f"{most_text}: scale it down, or crop the part to refine"
            )
        ww, wh = fields.get("work_width"), fields.get("work_height")
        if ww is not None and wh is not None and ww * wh > most:
            raise ConfigError(f"--work-size {ww}x{wh} = {ww * wh} pixels; this service accepts at most {most_text}")
        up = fields.get("upscale")  # --upscale, --upscale-to: the result counts
        problem = limit_problem(spec.width, spec.height, up["width"], up["height"], most) if up else None
        if problem is not None:
            raise ConfigError(f"--upscale: {problem}")
    chars = limits.get("max_prompt_chars")
    if isinstance(chars, int):
        for field in ("prompt", "negative_prompt"):
            text = fields.get(field) or ""
            if len(text) > chars:
                long = f"{_flag(field)} is {len(text)} characters long"
                raise ConfigError(f"{long}; the limit is {chars} (this service's)")


def check_job(image: Image, fields: dict[str, Any], job: str = "local") -> Message:
    """Check a job exactly as the service will (the protocol codec); ConfigError names the flag."""
    _check_text(fields)
    try:
        message = decode(CLIENT, encode(CLIENT, "submit", images={"image": image}, job=job, **fields))
        message.images = {"image": image}  # protocol 2 streams the pixels after the header; here they are at hand
        return message
    except ProtocolError as err:
        name = (err.field or "").split(".")[0]
        where = f"{_flag(name)}: " if _flag(name) != name else ""
        raise ConfigError(f"{where}{err.message}") from None


def step_note(requested_steps: int, strength: float, steps: int, denoise_steps: int, mode: str) -> str | None:
    """The line that says the service raised the steps (strength x steps gave no denoising step)."""
    if mode != "refine" or steps == requested_steps:
        return None
    return (
        f"note: strength {strength:g} x {requested_steps} steps gives no denoising step: "
        f"ran {denoise_steps} of {steps} steps"
    )
