"""Live refine (issue 22): what the plugin adds, in real Krita, and how fast a superseded job stops.

    python tests/benchmarks/bench_live.py [--size 1024] [--strokes 30] [--updates 500] [--detect 2048]
    python tests/benchmarks/bench_live.py --gpu --model DIR [--base-model DIR] --out OUT   # on a CUDA machine

1. In Krita (``tests/krita_driver/scenario_live_bench.py``, real Krita 5 under Xvfb, against an identity
   backend so that only the plugin is timed): per update at SIZE x SIZE, stroke end -> job sent minus the
   wait (goal <= 30 ms), result received -> preview shown (goal <= 30 ms), the UI thread's largest stall and
   the plugin's own longest call on it (goal: no stall over 50 ms from the plugin); ``--updates`` updates:
   Krita's memory, layer count and undo stack before and after; one change-detection check at DETECT x
   DETECT (goal <= 5 ms), Source: Layer and Source: Image.
2. A superseded job stops within one step: the demo model (CPU), a long live job, a newer live job sent
   at a progress step; the steps the old one still reports after that, and the time until its ``cancelled``.
3. ``--gpu`` (prepared for a GPU machine, called by bench_gpu.py too): stroke-to-preview latency at 512,
   768 and 1024 px for each speed level: the live job's request -> result on the service (prompt cached,
   live caps), plus the plugin's overheads measured in (1) and the wait.

Prints a table; writes JSON to tests/benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from krita_sdxl.backend.cli.client import ServiceClient  # noqa: E402
from krita_sdxl.backend.cli.launcher import start_service  # noqa: E402
from krita_sdxl.protocol import Image, ImageSpec  # noqa: E402
from krita_sdxl.protocol.policy import capped_steps  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LIVE = {"prompt": "a harbour at dusk, oil on canvas", "strength": 0.3}  # the docker's defaults: 30 steps x 0.3
LIVE_CALLS = 6  # the docker's default cap
SIZES = (512, 768, 1024)
LEVELS = ("off", "compile", "draft", "fp8", "trt")  # backend/speed/levels.py; a level that cannot run steps down
PLUGIN_MS = 45.0  # the plugin's own share at 1024x1024 in Krita (stroke end -> sent minus the wait, result -> shown;
# medians measured by the Krita part on a 2-core CPU machine): added to the GPU figures


def picture(width: int, height: int, seed: int = 0) -> Image:
    import random

    return Image(ImageSpec(width, height, "RGBA", 8), random.Random(seed).randbytes(width * height * 4))


# --- 1. in Krita -------------------------------------------------------------------------------------


def in_krita(args: argparse.Namespace) -> dict[str, Any]:
    import krita_harness

    krita_harness.require_krita = lambda: None
    missing = krita_harness.missing_tools()
    if missing:
        return {"skipped": f"no Krita here: {missing}"}
    work = Path(tempfile.mkdtemp(prefix="bench-live-"))
    svc = start_service(["--identity", "--log-level", "warning"], timeout=60)  # only the plugin is timed
    try:
        zip_path = krita_harness.load_build_plugin().build(work / "krita_sdxl_refiner.zip", vendor=False)
        settings = {"endpoint": svc.endpoint, "live_wait_ms": args.wait_ms, "source": "layer", "seed": 7, **LIVE}
        run = krita_harness.run_krita(
            "scenario_live_bench",
            work / "krita",
            name="bench-live",
            params={
                "size": args.size,
                "strokes": args.strokes,
                "updates": args.updates,
                "detect": args.detect,
                "timeout_s": 60,
            },
            plugin_zips=[zip_path],
            settings={"krita_sdxl": settings},
            timeout_s=args.krita_timeout,
            scenario_timeout_s=args.krita_timeout - 30,
            artifacts=None,
        )
        return run.check()
    finally:
        svc.stop()


# --- 2. a superseded job stops ------------------------------------------------------------------------


def supersede_stop(trials: int) -> dict[str, Any]:
    """The demo model on the CPU: a live job of 200 UNet calls, superseded at its 4th step."""
    cache = Path(tempfile.mkdtemp(prefix="bench-live-demo-"))
    svc = start_service(["--demo", "--cache-dir", str(cache), "--log-level", "warning"], timeout=300)
    rows = []
    try:
        with ServiceClient(svc.endpoint, timeout=60) as client:
            client.hello()
            image = picture(128, 128)
            for trial in range(trials):
                old = client.submit(image, prompt="x", steps=400, strength=0.5, seed=trial, live=True)
                steps, times = [], []
                for event in client.events(old):
                    if event.type == "progress":
                        steps.append(event["step"])
                        times.append(time.perf_counter())
                        if event["step"] == 4:
                            sent_at, sent_step = time.perf_counter(), event["step"]
                            new = client.submit(image, prompt="x", steps=4, strength=0.5, seed=trial, live=True,
                                                replaces=old)  # fmt: skip
                    elif event.type == "cancelled":
                        stopped = time.perf_counter()
                        break
                step_s = statistics.median(b - a for a, b in pairwise(times[:4]))
                rows.append({"reason": event["reason"], "steps_after": steps[-1] - sent_step,
                             "stop_s": round(stopped - sent_at, 4), "step_s": round(step_s, 4)})  # fmt: skip
                for _event in client.events(new):
                    pass
    finally:
        svc.stop()
    return {
        "trials": rows,
        "max_steps_after": max(r["steps_after"] for r in rows),
        "median_stop_s": round(statistics.median(r["stop_s"] for r in rows), 4),
        "median_step_s": round(statistics.median(r["step_s"] for r in rows), 4),
    }


# --- 3. on a GPU ----------------------------------------------------------------------------------------


def gpu_live(
    model: str,
    base_model: str | None = None,
    levels: tuple[str, ...] = LEVELS,
    sizes: tuple[int, ...] = SIZES,
    plugin_ms: float | None = None,
    wait_ms: int = 250,
    repeats: int = 8,
    deadline_s: float = 900.0,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Stroke-to-preview latency for each speed level and size: the service's request -> result of a live job
    (the docker's defaults: 30 steps x 0.3 capped to ``LIVE_CALLS`` UNet calls, the work size the side, one
    prompt so its embeddings are cached, a new picture each time), after three warm-up jobs per size (a
    compiled level compiles, a trt level builds its engines meanwhile and runs eager until they are ready).
    ``plugin_ms``: the plugin's own overheads (stroke end -> sent, result -> shown) from the Krita part; the
    latency is then ``wait + plugin + request``. Also how soon a superseded 1024 px job stops. For bench_gpu.py."""
    t0 = time.monotonic()
    out: dict[str, Any] = {"wait_ms": wait_ms, "plugin_ms": plugin_ms, "calls": LIVE_CALLS, "levels": {}}
    for level in levels:
        left = deadline_s - (time.monotonic() - t0)
        if left < 120:
            out["levels"][level] = {"skipped": f"time ({left:.0f} s left)"}
            continue
        args = ["--model", model, "--speed", level, "--log-level", "info", *extra_args]
        if base_model:
            args += ["--base-model", base_model]
        svc = start_service(args, timeout=min(left, 900), env=env)
        row: dict[str, Any] = {"runs_as": [ln[-200:] for ln in svc.lines if "speed" in ln][-3:]}
        try:
            with ServiceClient(svc.endpoint, timeout=600) as client:
                client.hello()
                for size in sizes:
                    fields = {**LIVE, "steps": capped_steps(30, LIVE["strength"], LIVE_CALLS), "seed": 1, "live": True,
                              "work_width": size, "work_height": size}  # fmt: skip
                    for i in range(3):
                        client.run(picture(size, size, seed=100 + i), **fields)
                    times = []
                    for i in range(repeats):
                        t = time.perf_counter()
                        client.run(picture(size, size, seed=i), **fields)
                        times.append(time.perf_counter() - t)
                    request_ms = statistics.median(times) * 1000
                    cell = {"request_ms": round(request_ms, 1), "all_ms": [round(x * 1000, 1) for x in times]}
                    if plugin_ms is not None:
                        cell["stroke_to_preview_ms"] = round(wait_ms + plugin_ms + request_ms, 1)
                    row[str(size)] = cell
                row["supersede_1024"] = _gpu_supersede(client)
        finally:
            svc.stop()
        out["levels"][level] = row
    return out


def _gpu_supersede(client: ServiceClient) -> dict[str, Any]:
    image = picture(1024, 1024)
    old = client.submit(image, prompt="x", steps=200, strength=1.0, seed=3, live=True)
    stamps: list[float] = []
    for event in client.events(old):
        if event.type == "progress":
            stamps.append(time.perf_counter())
            if event["step"] == 5:
                sent, new = time.perf_counter(), client.submit(image, prompt="x", steps=4, strength=0.5, live=True)
        elif event.type == "cancelled":
            stopped = time.perf_counter()
            break
    for _event in client.events(new):
        pass
    step = statistics.median(b - a for a, b in pairwise(stamps[:5]))
    return {"stop_ms": round((stopped - sent) * 1000, 1), "step_ms": round(step * 1000, 1)}


# --- the table ----------------------------------------------------------------------------------------


def _ms(v: dict[str, Any]) -> str:
    return f"median {v['median_ms']} ms, p90 {v['p90_ms']}, max {v['max_ms']}"


def table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    k = r.get("krita") or {}
    if "skipped" in k or not k:
        rows.append(("in Krita", k.get("skipped", "not run")))
    else:
        n = f"{k['size']}x{k['size']}"
        rows.append(
            (
                f"API stroke: stroke end -> job sent, minus the wait, {n} (goal 30 ms)",
                _ms(k["stroke_end_to_sent_minus_wait"]),
            )
        )
        rows.append(("  of it: the change seen (a check every 30 ms)", _ms(k["change_seen_after"])))
        rows.append(("  of it: started after the wait ended (Qt's timer)", _ms(k["fired_after_the_wait"])))
        rows.append(("  of it: capture, encode, send", _ms(k["capture_encode_send"])))
        calls = k["plugin_calls_on_ui_thread"]
        for label, what in (("capture", "Krita's read of the picture"), ("any_visible", "the visibility check"),
                            ("send", "encode and queue")):  # fmt: skip
            if label in calls:
                rows.append((f"    {what}", _ms(calls[label])))
        if "brush" in k:
            brush = k["brush"]
            rows.append((f"brush stroke with the mouse: stroke end -> job sent, minus the wait, {n} (goal 30 ms)",
                         _ms(brush["stroke_end_to_sent_minus_wait"])))  # fmt: skip
            rows.append(("  of it: the change seen (Krita's undo signal)", _ms(brush["change_seen_after"])))
            rows.append(("  brush stroke end -> preview shown (identity backend, wait included)",
                         _ms(brush["stroke_end_to_shown"])))  # fmt: skip
        rows.append((f"result received -> preview shown, {n} (goal 30 ms)", _ms(k["result_received_to_shown"])))
        if "show" in calls:
            rows.append(("  of it: setPixelData and Krita's redraw (refreshProjection)", _ms(calls["show"])))
        rows.append(
            ("  API stroke end -> preview shown (identity backend, wait included)", _ms(k["stroke_end_to_shown"]))
        )
        longest = f"tick {calls['tick']['max_ms']} ms, message {calls['message']['max_ms']} ms"
        rows.append(("the plugin's longest call on Krita's UI thread (goal < 50 ms)", longest))
        ui = k["ui"]
        rows.append(
            ("Krita's UI thread, largest gap between 10 ms ticks", f"{ui['max_gap_ms']} ms (p99 {ui['p99_gap_ms']} ms)")
        )
        s, b, a = k["soak"], k["soak"]["before"], k["soak"]["after"]
        rss = (
            f"Krita RSS {b['rss_kib'] // 1024} -> {k.get('soak_mid_rss_kib', 0) // 1024} -> {a['rss_kib'] // 1024} MiB"
        )
        counts = f"layers {b['layers']} -> {a['layers']}, undo stack {b['undo']} -> {a['undo']}"
        rows.append((f"{s['updates']} live updates ({s['seconds']} s)", f"{rss}; {counts}; previews {a['previews']}"))
        d = k["detect"]
        for kind in ("layer", "canvas"):
            v = d[kind]
            figure = f"unchanged {_ms(v['unchanged'])}; changed {_ms(v['changed'])}; every change seen: {v['all_seen']}"
            rows.append((f"change check, {d['size']}x{d['size']}, Source: {kind} (goal 5 ms)", figure))
    sup = r.get("supersede")
    if sup:
        what = f"superseded job, demo model on the CPU ({sup['median_step_s'] * 1000:.0f} ms a step)"
        stop = f"stopped {sup['median_stop_s'] * 1000:.0f} ms after the newer submit (median)"
        rows.append((what, f"{stop}, at most {sup['max_steps_after']} step(s) later"))
    before, after = r.get("load_before", [0.0])[0], r.get("load_after", [0.0])[0]
    load = f"{r.get('machine', '')}, load average {before:.1f} before, {after:.1f} after"
    return "\n".join([f"Machine: {load}", "", "| what | figure |", "|---|---|", *(f"| {w} | {f} |" for w, f in rows)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--strokes", type=int, default=30)
    ap.add_argument("--updates", type=int, default=500)
    ap.add_argument("--detect", type=int, default=2048)
    ap.add_argument("--wait-ms", type=int, default=100, help="live wait in the Krita part (it is subtracted)")
    ap.add_argument("--trials", type=int, default=5, help="superseded-job trials")
    ap.add_argument("--krita-timeout", type=float, default=900)
    ap.add_argument("--skip-krita", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="the GPU part (needs --model)")
    ap.add_argument("--model", help="--gpu: a refiner folder")
    ap.add_argument("--base-model")
    ap.add_argument("--plugin-ms", type=float, help="--gpu: the plugin's overheads from an earlier Krita run")
    ap.add_argument("--out", type=Path, help="--gpu: where to write its JSON")
    args = ap.parse_args()
    if args.gpu:
        result = gpu_live(args.model, args.base_model, plugin_ms=args.plugin_ms)
        path = (args.out or RESULTS) / f"{date.today()}-gpu-live.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 0
    results: dict[str, Any] = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                               "load_before": os.getloadavg()}  # fmt: skip
    if not args.skip_krita:
        results["krita"] = in_krita(args)
    results["supersede"] = supersede_stop(args.trials)
    results["load_after"] = os.getloadavg()
    text = table(results)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{date.today()}-cpu2-live.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{date.today()}-cpu2-live.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
