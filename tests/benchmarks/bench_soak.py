"""Soak: 1,000 demo-model jobs from 8 concurrent clients through one real service.

    python tests/benchmarks/bench_soak.py [--jobs 1000]

Every client must get exactly its own results (none lost, none duplicated) and the service's resident
memory must grow less than 10% after warm-up. Prints the figures; writes JSON to results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soak import run_soak

from krita_sdxl.backend.cli.launcher import start_service

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    svc = start_service(["--demo", "--cache-dir", tempfile.mkdtemp(), "--log-level", "warning"])
    try:
        report = run_soak(svc.endpoint, svc.proc.pid, args.jobs, args.clients)
    finally:
        svc.stop()
    ok = not report["errors"] and report["results"] == report["unique"] == report["jobs"]
    print(f"\nsoak: {report['jobs']} jobs from {args.clients} clients in {report['seconds']} s")
    print(f"  results {report['results']}, unique {report['unique']}, errors {len(report['errors'])}")
    print(
        f"  service RSS after warm-up {report['rss_after_warmup_kib']} KiB, at the end {report['rss_end_kib']} KiB "
        f"({report['rss_growth'] * 100:+.1f}%)"
    )
    print("  PASS" if ok and report["rss_growth"] < 0.10 else "  FAIL")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{date.today()}-cpu{os.cpu_count()}-soak.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
