"""Round trip of a layer through protocol + service (model replaced by identity) vs PNG.

    python tests/benchmarks/bench_transfer.py [--repeats 20] [--endpoint tcp|ipc]

Starts ``krita-sdxl serve --identity`` in a subprocess (a real service, real sockets), sends RGBA8 layers
of 1024x1024 and 4096x4096 and waits for the result, exactly as the plugin does. The PNG column is what a
PNG-over-HTTP design pays for the same pixels: encode + decode on the way in and again on the way out
(Pillow, compress_level 1, the fastest setting). Prints a table; writes JSON to tests/benchmarks/results/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from timing import median_ms

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.protocol import Image, ImageSpec

RESULTS = Path(__file__).parent / "results"


def layer(size: int) -> Image:
    """A painting-like layer: smooth colour gradients plus 3-bit grain (textured brushwork, scans)."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    px = np.empty((size, size, 4), np.uint8)
    px[..., 0] = ramp[None, :]
    px[..., 1] = ramp[:, None]
    px[..., 2] = 255 - ramp[None, :]
    px[..., 3] = 255
    grain = np.random.default_rng(size).integers(0, 8, (size, size, 3), dtype=np.uint8)
    px[..., :3] = (px[..., :3] & 0xF8) | grain
    return Image(ImageSpec(size, size, "BGRA", 8), px.tobytes())


def png_round_trip(img: Image) -> None:
    s = img.spec
    for _ in range(2):  # client -> service, then service -> client
        pil = PILImage.frombuffer("RGBA", (s.width, s.height), img.data, "raw", "RGBA", 0, 1)
        buf = io.BytesIO()
        pil.save(buf, format="PNG", compress_level=1)
        PILImage.open(io.BytesIO(buf.getvalue())).load()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--transport", choices=["tcp", "ipc"], default="tcp")
    args = ap.parse_args()
    extra = []
    if args.transport == "ipc":
        extra = ["--endpoint", f"ipc://{tempfile.mkdtemp()}/krita-sdxl.sock"]
    svc = start_service(["--identity", "--log-level", "warning", *extra])
    rows = []
    try:
        with ServiceClient(svc.endpoint, timeout=60) as client:
            client.hello()
            for size in (1024, 4096):
                img = layer(size)
                reps = args.repeats if size <= 1024 else max(3, args.repeats // 4)

                def service_trip(img=img) -> None:
                    out = client.run(img, prompt="x", seed=1)
                    assert out.images["image"].data.nbytes == img.spec.byte_length

                ours = median_ms(service_trip, reps)
                png = median_ms(lambda img=img: png_round_trip(img), max(3, reps // 4))
                rows.append(
                    {
                        "size": f"{size}x{size}",
                        "raw_frames_ms": round(ours, 2),
                        "png_ms": round(png, 1),
                        "speedup": round(png / ours, 1),
                    }
                )
    finally:
        svc.stop()
    print(f"\nRGBA8 layer round trip through krita-sdxl ({args.transport}, identity model) vs PNG encode+decode x2")
    print(f"{'size':>10} {'raw frames':>12} {'PNG':>10} {'speed-up':>9}")
    for r in rows:
        print(f"{r['size']:>10} {r['raw_frames_ms']:>9.2f} ms {r['png_ms']:>7.1f} ms {r['speedup']:>8.1f}x")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{date.today()}-cpu{os.cpu_count()}-transfer-{args.transport}.json"
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
