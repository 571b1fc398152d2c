"""Issue 11: a structure-aware fuzzer (tests/fuzz.py) against a real `krita-sdxl serve --identity` over
real sockets: no crash, every event decodes and validates, exact answers, flat memory, and a job after.
``KRITA_SDXL_FUZZ`` sets the count (default 50,000); tests/benchmarks/bench_fuzz.py runs more."""

from __future__ import annotations

import os

import pytest
from attack import rgba
from fuzz import run_fuzz

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import start_service

# The full 50,000 again: the "one message unanswered" of about 1 run in 2 was the fuzzer's accounting (a
# cancel of a job that ran to its end anyway is answered by the result): 5 of 5 runs clean since, 2 under load.
FUZZ_COUNT = int(os.environ.get("KRITA_SDXL_FUZZ", "50000"))


@pytest.mark.slow
def test_fuzzed_messages_never_break_the_service():
    svc = start_service(["--identity", "--log-level", "error"])
    try:
        report = run_fuzz(svc.endpoint, svc.proc.pid, FUZZ_COUNT, seed=11, batch=50)  # bursts under the intake budget
        print(
            f"\nfuzz: {report['messages']} messages in {report['seconds']} s ({report['messages_per_s']}/s), "
            f"{report['events']} events, {report['accepted']} jobs accepted and done; service RSS "
            f"{report['rss_warm_kib']} KiB after warm-up, {report['rss_end_kib']} KiB at the end; "
            f"errors {report['error_codes']}"
        )
        assert report["problems"] == [], report["problems"][:20]
        assert report["requests"] == FUZZ_COUNT and report["ended"] == report["accepted"] > 0
        assert report["results"] > 0.9 * report["accepted"]  # cancellations are rare
        assert svc.proc.poll() is None
        for code in ("bad_identity", "bad_header", "bad_field", "frame_mismatch", "version_mismatch", "unknown_job"):
            assert report["error_codes"].get(code, 0) > 0, code  # the fuzzer reached every kind of refusal
        growth = report["rss_end_kib"] - report["rss_warm_kib"]
        assert growth < 0.05 * report["rss_warm_kib"] + 4096, report["rss_kib"]  # flat after warm-up
        with ServiceClient(svc.endpoint, timeout=30) as c:
            done = c.run(rgba(40, 24, seed=5), prompt="after the storm", steps=4, strength=0.5, seed=1)
            assert done.type == "result" and bytes(done.images["image"].data) == bytes(rgba(40, 24, seed=5).data)
    finally:
        assert svc.stop() == 0, svc.log[-3000:]
