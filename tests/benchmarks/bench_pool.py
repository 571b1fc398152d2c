"""The GPU pool (`serve --pool ray`) against the single-process service, like with like.

    python tests/benchmarks/bench_pool.py [--part all|overhead|throughput|memory] [--rounds 3] [--repeats 40]

1. overhead: a 1024x1024 RGBA8 job on the identity engine (no model) through the single-process service
   and through a pool of one replica (its own local Ray), rounds interleaved (this machine's load drifts):
   per round the median and the 10th percentile of the job's time; the pool's overhead is the difference.
   Also what the pool no longer does per job: a 4 MiB ``ray.put`` each way, against the 4 MiB copy into
   shared memory it makes instead. Goal: <= 10 ms.
2. throughput: demo-model jobs (CPU, 128x128) from two clients at once, with the same torch threads on
   both sides: one single-process service on 1 thread against 1 CPU replica (a replica runs torch on one
   thread), and on 2 threads against 2 replicas (one thread each). The single process's own default
   (as many threads as cores) is shown too.
3. memory: resident memory of every process of each idle service after one job (RSS, and PSS, which
   shares the pages the processes have in common fairly): the service process, the replicas, Ray's own.

Prints tables; writes JSON to tests/benchmarks/results/. No GPU figures: where a GPU machine is available,
run the same with ``--model``/``--base-model`` real weights.
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

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import ServiceProcess, start_service
from krita_sdxl.backend.pool.reaper import descendants
from krita_sdxl.protocol import Image, ImageSpec

RESULTS = Path(__file__).parent / "results"
SETTLE_S = 5.0  # after a service stops: a stopped Ray's processes still take the CPU for a few seconds
DEMO_JOB = {"prompt": "a castle on a hill", "steps": 20, "strength": 0.5}  # 10 denoising steps
POOL1 = ["--pool", "ray", "--replicas", "1"]
POOL2 = ["--pool", "ray", "--replicas", "2"]


def image(size: int, seed: int = 0) -> Image:
    px = np.random.default_rng(seed).integers(0, 256, (size, size, 4), dtype=np.uint8)
    return Image(ImageSpec(size, size, "RGBA", 8), px.tobytes())


def started(args: list[str], threads: int | None = None) -> tuple[ServiceProcess, float]:
    """A service, and the seconds it took to start; ``threads``: torch's threads in the service process."""
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    t = time.perf_counter()
    svc = start_service([*args, "--log-level", "warning"], timeout=600, env=env)
    return svc, time.perf_counter() - t


def job_times_ms(args: list[str], repeats: int) -> tuple[list[float], float]:
    """Every timed 1024x1024 identity job's milliseconds (after 5 untimed), and the service's start seconds."""
    layer = image(1024)
    svc, start_s = started(["--identity", *args])
    try:
        with ServiceClient(svc.endpoint, timeout=60) as client:
            client.hello()
            for _ in range(5):
                client.run(layer, prompt="x", steps=1, strength=0.5, seed=1)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                client.run(layer, prompt="x", steps=1, strength=0.5, seed=1)
                times.append((time.perf_counter() - t) * 1000)
    finally:
        svc.stop()
    return times, start_s


def p10(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[0]


def copies_ms(repeats: int) -> dict[str, float]:
    """Median ms of moving one 4 MiB frame: ``ray.put`` (what the pool did twice a job) against a copy into
    a mapped shared-memory file (what it does instead, once each way)."""
    import ray

    from krita_sdxl.backend.pool.shm import SlotBuffers

    frame = np.frombuffer(image(1024).data, np.uint8)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    buffers = SlotBuffers(f"bench-{os.getpid()}")
    try:
        out = {}
        for name, fn in (("ray_put", lambda: ray.put(frame)),
                         ("shm_copy", lambda: buffers.for_input(frame.nbytes).write(0, frame.data))):  # fmt: skip
            for _ in range(3):
                fn()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
            out[name] = statistics.median(times)
        return out
    finally:
        buffers.retire()
        ray.shutdown()


def overhead(rounds: int, repeats: int) -> dict:
    rows: dict[str, list[dict[str, float]]] = {"single": [], "pool": []}
    starts = []
    for _ in range(rounds):
        for name, args in (("single", []), ("pool", POOL1)):
            times, start_s = job_times_ms(args, repeats)
            rows[name].append({"median": statistics.median(times), "p10": p10(times), "load": os.getloadavg()[0]})
            if name == "pool":
                starts.append(start_s)
            time.sleep(SETTLE_S)
    diffs = [p["median"] - s["median"] for s, p in zip(rows["single"], rows["pool"], strict=True)]
    diffs10 = [p["p10"] - s["p10"] for s, p in zip(rows["single"], rows["pool"], strict=True)]
    print(f"\nper-job time, 1024x1024 RGBA8, identity engine ({repeats} jobs a round, rounds interleaved)")
    print(f"  {'round':>5} {'single ms':>10} {'pool ms':>9} {'overhead':>9}   {'p10: single':>12} {'pool':>6} "
          f"{'overhead':>9}   load")  # fmt: skip
    for i, (s, p) in enumerate(zip(rows["single"], rows["pool"], strict=True)):
        print(f"  {i + 1:>5} {s['median']:10.2f} {p['median']:9.2f} {diffs[i]:9.2f}   {s['p10']:12.2f} "
              f"{p['p10']:6.2f} {diffs10[i]:9.2f}   {p['load']:.1f}")  # fmt: skip
    print(f"  pool overhead: median {statistics.median(diffs):.2f} ms over the rounds (goal <= 10 ms)")
    moved = copies_ms(repeats)
    print(f"  a 4 MiB frame: ray.put {moved['ray_put']:.2f} ms (was done twice a job); copy into shared memory "
          f"{moved['shm_copy']:.2f} ms (done instead)")  # fmt: skip
    print(f"  pool start (local Ray, identity): {statistics.median(starts):.1f} s")
    return {
        "rounds": rows,
        "overhead_ms": [round(d, 2) for d in diffs],
        "overhead_p10_ms": [round(d, 2) for d in diffs10],
        "overhead_median_ms": round(statistics.median(diffs), 2),
        "goal_ms": 10,
        "frame_4mib_ms": {k: round(v, 2) for k, v in moved.items()},
        "pool_start_s": round(statistics.median(starts), 1),
    }


def rate(args: list[str], jobs: int, cache: str, threads: int | None) -> tuple[float, float]:
    """(jobs per second for ``jobs`` demo jobs from two clients at once, seconds to start)."""
    svc, start_s = started(["--demo", "--cache-dir", cache, *args], threads)
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
        per_s = jobs / (time.perf_counter() - t)
        for c in clients:
            c.close()
    finally:
        svc.stop()
    return per_s, start_s


def throughput(rounds: int, jobs: int, cache: str) -> dict:
    cores = os.cpu_count() or 1
    rows = [  # (name, serve args, torch threads of the single process, torch threads in all)
        ("single process, 1 thread", [], 1, 1),
        ("pool, 1 CPU replica", POOL1, None, 1),
        ("single process, 2 threads", [], 2, 2),
        ("pool, 2 CPU replicas", POOL2, None, 2),
        (f"single process, {cores} threads (default)", [], None, cores),
    ]
    runs: dict[str, list[float]] = {}
    starts: dict[str, float] = {}
    for _ in range(rounds):
        for name, args, threads, _total in rows:
            per_s, starts[name] = rate(args, jobs, cache, threads)
            runs.setdefault(name, []).append(per_s)
            time.sleep(SETTLE_S)
    print(f"\nthroughput, demo model on CPU, 128x128, {DEMO_JOB['steps']} x {DEMO_JOB['strength']}, {jobs} jobs from")
    print(f"2 clients at once; torch threads: the same on both sides of each pair ({cores} cores here)")
    print(f"  {'':36}{'threads':>8}{'jobs/s':>8}{'start s':>9}   every round")
    for name, _args, _threads, total in rows:
        median = statistics.median(runs[name])
        every = " ".join(f"{r:.2f}" for r in runs[name])
        print(f"  {name:36}{total:>8}{median:8.2f}{starts[name]:9.1f}   {every}")
    return {
        "jobs_per_s": {name: round(statistics.median(runs[name]), 3) for name, *_ in rows},
        "rounds": {k: [round(r, 3) for r in v] for k, v in runs.items()},
        "torch_threads": {name: total for name, _a, _t, total in rows},
        "start_s": {k: round(v, 1) for k, v in starts.items()},
    }


def _kib(pid: int, path: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _kind(pid: int) -> str:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"
    if comm.startswith("ray::ServeRepli"):
        return "replicas"
    return "Ray's own (gcs_server, raylet, agents, Serve controller, ...)"


def footprint(args: list[str], cache: str) -> dict[str, dict[str, float]]:
    """MiB of RSS and PSS, by kind of process, of an idle service after one demo job."""
    svc, _ = started(["--demo", "--cache-dir", cache, *args])
    try:
        with ServiceClient(svc.endpoint, timeout=120) as client:
            client.hello()
            client.run(image(128), seed=0, **DEMO_JOB)
        time.sleep(3.0)
        groups: dict[str, dict[str, float]] = {}
        pids = [(svc.proc.pid, "the service process")] + [(p, _kind(p)) for p in descendants(svc.proc.pid)]
        for pid, kind in pids:
            if kind == "gone" or "reaper" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                continue
            row = groups.setdefault(kind, {"processes": 0, "rss": 0.0, "pss": 0.0})
            row["processes"] += 1
            row["rss"] += _kib(pid, "status", "VmRSS") / 1024
            row["pss"] += _kib(pid, "smaps_rollup", "Pss") / 1024
        return groups
    finally:
        svc.stop()


def memory(cache: str) -> dict:
    out = {}
    print("\nmemory of an idle service after one demo job, MiB (PSS shares common pages fairly)")
    print(f"  {'':26}{'':64}{'procs':>6}{'RSS':>8}{'PSS':>8}")
    for name, args in (("single process", []), ("pool, 1 CPU replica", POOL1), ("pool, 2 CPU replicas", POOL2)):
        groups = footprint(args, cache)
        out[name] = {k: {m: round(v, 1) for m, v in row.items()} for k, row in groups.items()}
        total = {m: sum(row[m] for row in groups.values()) for m in ("processes", "rss", "pss")}
        for kind, row in groups.items():
            print(f"  {name:26}{kind:64}{row['processes']:6.0f}{row['rss']:8.0f}{row['pss']:8.0f}")
        print(f"  {name:26}{'all':64}{total['processes']:6.0f}{total['rss']:8.0f}{total['pss']:8.0f}")
        out[name]["all"] = {m: round(v, 1) for m, v in total.items()}
        time.sleep(SETTLE_S)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--part", choices=("all", "overhead", "throughput", "memory"), default="all",
        help="which measurement to run (default: all three)")  # fmt: skip
    add("--rounds", type=int, default=3,
        help="interleaved rounds of each comparison; the median round is reported (default: 3)")  # fmt: skip
    add("--repeats", type=int, default=40,
        help="timed 1024x1024 jobs per service and round, after 5 untimed (default: 40)")  # fmt: skip
    add("--jobs", type=int, default=16,
        help="demo jobs per throughput run, half from each of two clients (default: 16)")  # fmt: skip
    args = ap.parse_args()
    cache = tempfile.mkdtemp()
    row: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(), "gpu": None}
    if args.part in ("all", "overhead"):
        row["overhead_1024_rgba8"] = overhead(args.rounds, args.repeats)
    if args.part in ("all", "throughput"):
        row["throughput_demo"] = throughput(args.rounds, args.jobs, cache)
    if args.part in ("all", "memory"):
        row["memory_idle_mib"] = memory(cache)
    print("  GPU figures: none (no GPU machine was available for this run)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{date.today()}-cpu{os.cpu_count()}-pool-{args.part}.json"
    out.write_text(json.dumps(row, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
