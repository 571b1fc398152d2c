"""Large layers over a slow link and the largest job on loopback (issue 20, item 2).

    python tests/benchmarks/bench_slow_link.py [--mib 256] [--rate 10] [--skip-max]

Starts ``krita-sdxl serve --identity`` (a real service, real sockets). First, a layer of ``--mib`` MiB
(RGBA 8-bit) goes through a real throttling TCP proxy limited to ``--rate`` MB/s each way
(tests/throttle.py) and comes back: the time up and down, and whether every byte arrived. Then the
protocol's largest submit, 8192x8192 RGBA float32 (1 GiB), on loopback while four other clients keep
the service busy with small jobs: its round trip, and the others' jobs meanwhile. Writes JSON to
results/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throttle import ThrottleProxy

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.protocol import Image, ImageSpec

RESULTS = Path(__file__).parent / "results"
MiB = 1024 * 1024


def layer(spec: ImageSpec) -> Image:
    block = os.urandom(MiB)
    data = (block * (spec.byte_length // MiB + 1))[: spec.byte_length]
    return Image(spec, data)


def round_trip(endpoint: str, image: Image, timeout: float) -> dict:
    up_done = [0.0]
    with ServiceClient(endpoint, timeout=timeout) as c:
        c.hello()
        t0 = time.monotonic()
        job = c.submit(image, steps=2, strength=0.5, seed=1)
        result = None
        for event in c.events(job, timeout=timeout):
            if event.type == "accepted":
                up_done[0] = time.monotonic()
            if event.type in ("result", "error", "cancelled"):
                result = event
        t1 = time.monotonic()
    ok = result is not None and result.type == "result"
    same = ok and hashlib.sha256(result.images["image"].data).digest() == hashlib.sha256(image.data).digest()
    return {
        "mib": round(image.spec.byte_length / MiB, 1),
        "ok": bool(ok and same),
        "outcome": result.type if result is not None else None,
        "up_s": round(up_done[0] - t0, 2) if up_done[0] else None,
        "down_s": round(t1 - up_done[0], 2) if up_done[0] else None,
        "total_s": round(t1 - t0, 2),
    }


def busy(endpoint: str, stop: threading.Event, done: list[int]) -> None:
    small = layer(ImageSpec(256, 256, "RGBA", 8))
    with ServiceClient(endpoint, timeout=120) as c:
        while not stop.is_set():
            c.run(small, steps=2, strength=0.5)
            done[0] += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rate", type=float, default=10.0, help="MB/s each way")
    ap.add_argument("--skip-max", action="store_true", help="leave out the 1 GiB job on loopback")
    ap.add_argument("--skip-slow", action="store_true", help="leave out the slow link")
    args = ap.parse_args()
    svc = start_service(["--identity", "--log-level", "warning"])
    report: dict = {}
    try:
        if not args.skip_slow:
            side = 1
            while side * side * 4 < args.mib * MiB:
                side *= 2
            spec = ImageSpec(side, args.mib * MiB // (side * 4), "RGBA", 8)
            port = int(svc.endpoint.rsplit(":", 1)[1])
            with ThrottleProxy("127.0.0.1", port, rate=args.rate * 1e6) as proxy:
                row = round_trip(proxy.endpoint, layer(spec), timeout=60)
            row["rate_mb_s"] = args.rate
            report["slow_link"] = row
            print(f"{row['mib']} MiB through a {args.rate:g} MB/s proxy: {row['outcome']}, every byte back: "
                  f"{row['ok']}; up {row['up_s']} s, down {row['down_s']} s", flush=True)  # fmt: skip
        if not args.skip_max:
            stop, done = threading.Event(), [0]
            others = [threading.Thread(target=busy, args=(svc.endpoint, stop, done)) for _ in range(4)]
            for t in others:
                t.start()
            time.sleep(1.0)
            before = done[0]
            row = round_trip(svc.endpoint, layer(ImageSpec(8192, 8192, "RGBA", 32, "float")), timeout=120)
            row["other_jobs_meanwhile"] = done[0] - before
            stop.set()
            for t in others:
                t.join(60)
            report["loopback_max"] = row
            print(f"{row['mib']} MiB (8192x8192 RGBA float32) on loopback under load: {row['outcome']}, every byte "
                  f"back: {row['ok']}; up {row['up_s']} s, down {row['down_s']} s; {row['other_jobs_meanwhile']} "
                  "other jobs done meanwhile", flush=True)  # fmt: skip
    finally:
        svc.stop()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{date.today()}-cpu{os.cpu_count()}-slow-link.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
