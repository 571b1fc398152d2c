"""``krita-sdxl demo``: the whole system offline in one command.

Starts ``krita-sdxl serve --demo`` in the background, makes a sample picture, refines it through the
service exactly as the Krita plugin would (ZeroMQ, raw frames, progress events), writes both PNGs and
stops the service.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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
    alpha = PILImage.linear_gradient("L").rotate(90).resize((width, height)).point(lambda v: 255 - v // 4)
    img.putalpha(alpha)
    return Image(ImageSpec(width, height, "RGBA", 8), img.tobytes())


def save_png(img: Image, path: Path) -> None:
    from PIL import Image as PILImage

    s = img.spec
    PILImage.frombuffer("RGBA", (s.width, s.height), bytes(img.data), "raw", s.order, 0, 1).save(path)


def run_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .client import ServiceClient
    from .launcher import start_service

    out: Path = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    source = sample_image()
    sample_path = out.with_name(out.stem + "-input.png")
    save_png(source, sample_path)
    extra = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    print("starting krita-sdxl serve --demo in the background ...", flush=True)
    service = start_service(["--demo", "--log-level", "warning", *extra])
    try:
        with ServiceClient(service.endpoint, timeout=120) as client:
            caps = client.hello()["capabilities"]
            print(
                f"service ready on {service.endpoint}: device {caps['device']}, model {caps['models'][0]['name']}",
                flush=True,
            )
            t0 = time.perf_counter()
            with tqdm(total=0, unit="step", desc="refine") as bar:

                def on_event(event) -> None:
                    if event.type == "accepted":
                        bar.reset(total=event["denoise_steps"])
                    elif event.type == "progress":
                        bar.n = event["step"]
                        bar.refresh()

                done = client.run(
                    source,
                    on_event=on_event,
                    prompt=args.prompt,
                    strength=args.strength,
                    steps=args.steps,
                    seed=args.seed,
                )
            elapsed = time.perf_counter() - t0
    finally:
        service.stop()
    save_png(done.images["image"], out)
    print(f"wrote {sample_path} (input) and {out} (refined, seed {done['seed']}, {elapsed:.2f} s)")
    print("the demo model has random weights: the refined pixels are noise-like by design")
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="run the whole system offline on the tiny demo model",
        description="Start a demo service, refine a generated picture through it, write PNGs.",
    )
    p.add_argument("-o", "--output", type=Path, default=Path("refined.png"), help="result PNG (default refined.png)")
    p.add_argument("--prompt", default="a sunny landscape, oil painting")
    p.add_argument("--strength", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache-dir", help="where the demo model is built (default: ~/.cache/krita-sdxl)")
