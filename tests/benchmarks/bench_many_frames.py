"""The service's memory under one message of many frames (issue 20, item 3).

    python tests/benchmarks/bench_many_frames.py [--frames 1000 2000 3000]

Starts ``krita-sdxl serve --identity`` (a real service, tcp on loopback) and, for each N, sends one
message: a heartbeat header and N frames of 1 MiB from a raw DEALER. Samples the service's resident
memory every 5 ms and prints the peak growth over its resting size, whether the service cut the
connection and how long it took. The message's header speaks no particular protocol version: any
service buffers the frames before it can look at the header, so the script measures old and new
code alike. Writes JSON to results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from datetime import date
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soak import rss_kib

from krita_sdxl.backend.cli.launcher import start_service

RESULTS = Path(__file__).parent / "results"
MiB = 1024 * 1024


def one(endpoint: str, pid: int, frames: int) -> dict:
    rest = rss_kib(pid)
    samples = [rest]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_kib(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    ctx = zmq.Context()
    t0 = time.monotonic()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.ROUTING_ID, b"bench-" + os.urandom(16))
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(endpoint)
        head = msgpack.packb({"v": 2, "type": "heartbeat"})
        sock.send_multipart([head, *([b"\xab" * MiB] * frames)], copy=False)
        cut = monitor.poll(120_000) != 0
        answer = None
        if not cut and sock.poll(1000):
            answer = msgpack.unpackb(sock.recv_multipart()[0]).get("code")
        seconds = time.monotonic() - t0
        time.sleep(0.5)
    finally:
        ctx.destroy(linger=0)
        done.set()
        sampler.join()
    return {
        "frames": frames,
        "rss_rest_mib": round(rest / 1024, 1),
        "rss_peak_growth_mib": round((max(samples) - rest) / 1024, 1),
        "cut": cut,
        "answer": answer,
        "seconds": round(seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[1000, 2000, 3000])
    ap.add_argument("--label", default="after", help="a name for this run in the JSON (e.g. before, after)")
    args = ap.parse_args()
    svc = start_service(["--identity", "--log-level", "warning"])
    rows = []
    try:
        for n in args.frames:
            row = one(svc.endpoint, svc.proc.pid, n)
            rows.append(row)
            print(
                f"{n:5d} frames of 1 MiB: service RSS +{row['rss_peak_growth_mib']:.0f} MiB at peak, "
                f"{'connection cut' if row['cut'] else 'answered ' + str(row['answer'])} after {row['seconds']} s",
                flush=True,
            )
    finally:
        svc.stop()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{date.today()}-cpu{os.cpu_count()}-many-frames-{args.label}.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
