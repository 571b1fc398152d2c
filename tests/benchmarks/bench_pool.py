"""The GPU pool (`serve --pool ray`) against the single-process service.

    python tests/benchmarks/bench_pool.py [--repeats 30] [--jobs 16]

1. Per-job overhead: a 1024x1024 RGBA8 job with the identity engine (no model) through the single-process
   service and through a pool of one replica; the difference of the medians is what the pool adds
   (object store in and out, the Ray Serve handle call, the streamed events). Goal: <= 10 ms.
2. Throughput on the demo model (CPU): ``--jobs`` jobs from two clients at once, through the single-process
   service and through pools of 1 and 2 CPU replicas.

Each pool starts its own local Ray (the default of `serve --pool ray`). No GPU figures: where a GPU machine
is available, run the same with ``--model``/``--base-model`` real weights and ``--replicas`` per GPU.
Prints a table; writes JSON to tests/benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
from timing import median_ms

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import ServiceProcess, start_service
from krita_sdxl.protocol import Image, ImageSpec

RESULTS = Path(__file__).parent / "results"
SETTLE_S = 5.0  # after a service stops: a stopped Ray's processes still take the CPU for a few seconds
DEMO_JOB = {"prompt": "a castle on a hill", "steps": 20, "strength": 0.5}  # 10 denoising steps


def image(size: int, seed: int = 0) -> Image:
    px = np.random.default_rng(seed).integers(0, 256, (size, size, 4), dtype=np.uint8)
    return Image(ImageSpec(size, size, "RGBA", 8), px.tobytes())


def started(args: list[str]) -> tuple[ServiceProcess, float]:
    t = time.perf_counter()
    svc = start_service([*args, "--log-level", "warning"], timeout=600)
    return svc, time.perf_counter() - t


def overhead(args: list[str], repeats: int) -> tuple[float, float]:
    """(median ms of a 1024x1024 identity job, seconds to start)."""
    layer = image(1024)
    svc, start_s = started(["--identity", *args])
    try:
        with ServiceClient(svc.endpoint, timeout=60) as client:
            client.hello()
            ms = median_ms(lambda: client.run(layer, prompt="x", steps=1, strength=0.5, seed=1), repeats, warmup=5)
    finally:
        svc.stop()
    return ms, start_s


def throughput(args: list[str], jobs: int, cache: str) -> tuple[float, float]:
    """(jobs per second for ``jobs`` demo jobs from two clients at once, seconds to start)."""
    svc, start_s = started(["--demo", "--cache-dir", cache, *args])
    try:
        clients = [ServiceClient(svc.endpoint, timeout=120) for _ in range(2)]
        for c in clients:
            c.hello()
        for c in clients:  # one warm-up job each (first calls allocate)
            c.run(image(128), seed=0, **DEMO_JOB)

        def drain(c: ServiceClient, mine: set[str]) -> None:  # each client reads (and heartbeats) on its own
            while mine:
                event = c.receive()
                if event.type in ("result", "error", "cancelled") and event.job in mine:
                    assert event.type == "result", event.fields
                    mine.discard(event.job)

        t = time.perf_counter()
        pending: dict[int, set[str]] = {0: set(), 1: set()}
        for i in range(jobs):
            pending[i % 2].add(clients[i % 2].submit(image(128, i), seed=i, **DEMO_JOB))
        readers = [threading.Thread(target=drain, args=(clients[k], pending[k])) for k in (0, 1)]
        for r in readers:
            r.start()
        for r in readers:
            r.join()
        assert not pending[0] and not pending[1], pending
        rate = jobs / (time.perf_counter() - t)
        for c in clients:
            c.close()
    finally:
        svc.stop()
    return rate, start_s


def store_write_ms(repeats: int) -> float:
    """Median ms of one ``ray.put`` of a 1024x1024 RGBA8 frame: the pool writes two per job (the
    source in, the result out)."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        frame = np.frombuffer(image(1024).data, np.uint8)
        return median_ms(lambda: ray.put(frame), repeats, warmup=3)
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cache = tempfile.mkdtemp()
    pool1, pool2 = ["--pool", "ray", "--replicas", "1"], ["--pool", "ray", "--replicas", "2"]

    single_ms, _ = overhead([], args.repeats)
    time.sleep(SETTLE_S)
    pool_ms, pool_start = overhead(pool1, args.repeats)
    time.sleep(SETTLE_S)
    put_ms = store_write_ms(args.repeats)
    rates: dict[str, float] = {}
    starts: dict[str, float] = {}
    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # interleaved rounds: this machine's load drifts; the median is reported
        for name, extra in (("single process", []), ("pool, 1 CPU replica", pool1), ("pool, 2 CPU replicas", pool2)):
            rate, starts[name] = throughput(extra, args.jobs, cache)
            runs.setdefault(name, []).append(rate)
            time.sleep(SETTLE_S)
    rates = {name: statistics.median(r) for name, r in runs.items()}

    print("\nper-job overhead, 1024x1024 RGBA8, identity engine (median of", args.repeats, "jobs)")
    print(f"  single-process service   {single_ms:8.2f} ms")
    print(f"  pool, 1 replica          {pool_ms:8.2f} ms")
    print(f"  pool overhead            {pool_ms - single_ms:8.2f} ms   (goal <= 10 ms)")
    print(f"  of which: 2 object-store writes of 4 MiB (ray.put {put_ms:.2f} ms each)")
    print(f"  pool start (local Ray, identity)  {pool_start:6.1f} s")
    print(f"\nthroughput, demo model on CPU, 128x128, {DEMO_JOB['steps']} x {DEMO_JOB['strength']}, {args.jobs} jobs")
    print("  from 2 clients at once")
    print(f"  {'':26}{'jobs/s':>8}{'start s':>9}   every round")
    for name, rate in rates.items():
        print(f"  {name:26}{rate:8.2f}{starts[name]:9.1f}   {' '.join(f'{r:.2f}' for r in runs[name])}")
    print("  GPU figures: none (no GPU machine was available for this run)")
    row = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "overhead_1024_rgba8": {
            "single_ms": round(single_ms, 2),
            "pool_ms": round(pool_ms, 2),
            "overhead_ms": round(pool_ms - single_ms, 2),
            "goal_ms": 10,
            "ray_put_4mib_ms": round(put_ms, 2),
        },
        "throughput_demo_jobs_per_s": {k: round(v, 3) for k, v in rates.items()},
        "throughput_rounds": {k: [round(r, 3) for r in v] for k, v in runs.items()},
        "start_s": {"pool_identity": round(pool_start, 1), **{k: round(v, 1) for k, v in starts.items()}},
        "gpu": None,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{date.today()}-cpu{os.cpu_count()}-pool.json"
    out.write_text(json.dumps(row, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
