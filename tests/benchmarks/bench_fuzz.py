"""The fuzzer of tests/fuzz.py at length, against a real `krita-sdxl serve --identity`.

    python tests/benchmarks/bench_fuzz.py [--messages 500000] [--seed 1]

Prints messages/s, the service's resident memory after warm-up and at the end, and the error codes
seen; fails (exit 1) on any problem (an event that does not decode, a missing or extra answer, an
``internal`` error, a crash). Writes JSON to results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz import run_fuzz

from krita_sdxl.backend.cli.launcher import start_service

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    svc = start_service(["--identity", "--log-level", "error"])
    try:
        report = run_fuzz(svc.endpoint, svc.proc.pid, args.messages, seed=args.seed)
        alive = svc.proc.poll() is None
    finally:
        code = svc.stop()
    report["service_alive"] = alive
    report["exit_code"] = code
    print(f"fuzz: {report['messages']} messages in {report['seconds']} s = {report['messages_per_s']} messages/s")
    print(f"  events {report['events']}, jobs accepted and done {report['accepted']}/{report['results']}")
    print(f"  service RSS {report['rss_warm_kib']} KiB after warm-up, {report['rss_end_kib']} KiB at the end "
          f"({100 * report['rss_growth_after_warmup']:+.2f} %)")  # fmt: skip
    print(f"  error codes {report['error_codes']}")
    print(f"  problems {len(report['problems'])}: {report['problems'][:5]}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{date.today()}-fuzz.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0 if not report["problems"] and alive and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
