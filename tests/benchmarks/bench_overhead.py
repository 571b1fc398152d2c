"""Service overhead: a demo-model job through the real service vs the same engine call made directly.

    python tests/benchmarks/bench_overhead.py [--size 128] [--repeats 30]

Both sides run the same tiny demo pipeline on the CPU with the same seed and parameters; the difference of
the medians is what the service adds (sockets, codec, queue, worker hand-off, result transfer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
from timing import median_ms

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.protocol import CLIENT, Image, ImageSpec, decode, encode

RESULTS = Path(__file__).parent / "results"
PARAMS = dict(prompt="a castle on a hill", strength=0.3, steps=10, seed=7)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    cache = tempfile.mkdtemp()
    px = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 4), dtype=np.uint8).tobytes()
    image = Image(ImageSpec(args.size, args.size, "RGBA", 8), px)

    engine = Engine.load(model=None, demo=True, allow_download=False, device="cpu", dtype="auto", cache_dir=Path(cache))
    msg = decode(CLIENT, encode(CLIENT, "submit", images={"image": image}, job="direct", **PARAMS))
    msg.images = {"image": image}  # protocol 2: the pixels follow in chunks
    req = RefineRequest.from_message(msg, PARAMS["seed"])
    direct = median_ms(lambda: engine.refine(req, lambda *a: None, lambda: False), args.repeats, warmup=3)

    svc = start_service(["--demo", "--device", "cpu", "--cache-dir", cache, "--log-level", "warning"])
    try:
        with ServiceClient(svc.endpoint, timeout=60) as client:
            client.hello()
            served = median_ms(lambda: client.run(image, **PARAMS), args.repeats, warmup=3)
    finally:
        svc.stop()
    row = {
        "size": args.size,
        "direct_ms": round(direct, 2),
        "service_ms": round(served, 2),
        "overhead_ms": round(served - direct, 2),
    }
    print(f"\ndemo-model refine {args.size}x{args.size}, {PARAMS['steps']} steps x {PARAMS['strength']} (CPU)")
    print(f"  direct engine call  {row['direct_ms']:8.2f} ms")
    print(f"  through the service {row['service_ms']:8.2f} ms")
    print(f"  service overhead    {row['overhead_ms']:8.2f} ms")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{date.today()}-cpu{os.cpu_count()}-overhead.json"
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), **row}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
