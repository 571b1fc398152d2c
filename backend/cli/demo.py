"""``krita-sdxl demo``: the whole system offline in one command.

Starts ``krita-sdxl serve --demo`` in the background, makes a sample picture, refines it through the
service exactly as the Krita plugin would (ZeroMQ, raw frames, progress events), writes the result
(and the sample picture only when asked) and stops the service.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from krita_sdxl.backend.common.config import CommandFailed, ConfigError, default_cache_dir
from krita_sdxl.protocol import Image, ImageSpec


def sample_image(width: int = 512, height: int = 384) -> Image:
    """A generated RGBA picture with a sky gradient, a sun, hills and a soft alpha edge."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    img = PILImage.new("RGBA", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):
        t = y / max(height - 1, 1)
        draw.line([(0, y), (width, y)], fill=(int(70 + 120 * t), int(130 + 80 * t), int(220 - 60 * t), 255))
    draw.ellipse([width * 0.65, height * 0.1, width * 0.85, height * 0.1 + width * 0.2], fill=(255, 210, 90, 255))
    draw.polygon(
        [(0, height), (0, height * 0.7), (width * 0.4, height * 0.55), (width, height * 0.75), (width, height)],
        fill=(60, 120, 60, 255),
    )
    alpha = PILImage.linear_gradient("L").rotate(90).resize((width, height)).point([255 - v // 4 for v in range(256)])
    img.putalpha(alpha)
    return Image(ImageSpec(width, height, "RGBA", 8), img.tobytes())


def _same_file(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def run_demo(args: argparse.Namespace) -> int:
    from .client import ServiceClient
    from .imageio import Picture, plan_output
    from .job_options import check_job, step_note
    from .launcher import start_service
    from .refine import Progress, save

    source = Picture(sample_image(), grey=False)
    out = plan_output(args.output, source)  # checked before the service starts
    sample = plan_output(args.save_input, source) if args.save_input else None
    if sample is not None and _same_file(sample.path, out.path):
        raise ConfigError(
            f"--save-input {args.save_input} and -o {args.output} name the same file; give the input picture "
            "another name"
        )
    fields = dict(prompt=args.prompt, strength=args.strength, steps=args.steps, seed=args.seed)
    check_job(source.image, fields)
    extra = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    print(f"starting krita-sdxl serve --demo in the background (its model is built once into {cache}, "
          "then reused) ...", flush=True)  # fmt: skip
    service = start_service(["--demo", "--log-level", "warning", *extra])
    progress = Progress()
    try:
        with ServiceClient(service.endpoint, timeout=120) as client:
            caps = client.hello()["capabilities"]
            print(
                f"service ready on {service.endpoint}: device {caps['device']}, model {caps['models'][0]['name']}",
                flush=True,
            )
            t0 = time.perf_counter()
            job = client.submit(source.image, **fields)
            for event in client.events(job):
                if event.type == "credit":  # the upload's progress: the demo picture goes up in one window
                    continue
                if event.type == "accepted":
                    note = step_note(args.steps, args.strength, event["steps"], event["denoise_steps"], "refine")
                    if note:
                        progress.note(note)
                elif event.type == "progress":
                    progress.step(event["step"], event["total"])
                elif event.type != "result":
                    raise CommandFailed(f"the demo job ended with {event.type}: {event.fields.get('message', '')}")
                else:
                    done = event
            elapsed = time.perf_counter() - t0
    finally:
        progress.close()
        service.stop()
    save(out, done.images["image"], job)
    if sample is not None:
        save(sample, source.image, "input")
        print(f"wrote {sample.path} (the generated input picture)")
    print(f"wrote {out.path} (refined, seed {done['seed']}, {elapsed:.2f} s)")
    print("the demo model has random weights: the refined pixels are noise-like by design")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="run the whole system offline on the tiny demo model",
        description="Start a demo service in the background, refine a generated picture through it exactly as "
        "the Krita plugin would, write the result, stop the service. Writes -o (and --save-input) where you "
        "are; the demo model (about 7 MB) is built once into the cache folder (--cache-dir) and reused.",
    )
    p.add_argument("-o", "--output", default="refined.png", help="the result (default: refined.png)")
    p.add_argument("--save-input", metavar="FILE", help="also write the generated input picture here")
    p.add_argument("--prompt", default="a sunny landscape, oil painting", help="(default: %(default)r)")
    p.add_argument("--strength", type=float, default=0.3, help="how much to change, 0 < s <= 1 (default: 0.3)")
    p.add_argument("--steps", type=int, default=50, help="scheduler steps, 1 to 500 (default: 50)")
    p.add_argument("--seed", type=int, default=1234, help="random seed (default: 1234)")
    p.add_argument(
        "--cache-dir", help="where the demo model is built (default: $KRITA_SDXL_CACHE or ~/.cache/krita-sdxl)"
    )
