"""The ``--speed`` levels on one GPU, in one short run: stock diffusers, this project plain, and each level.

    python tests/benchmarks/bench_speed_levels.py --out DIR --results-dir tests/benchmarks/results   # CUDA
    python tests/benchmarks/bench_speed_levels.py --tiny --out DIR      # tiny shapes on the CPU: smoke test

tests/benchmarks/DEVICE_RUN.md has the one command for a lent GPU machine (wheels to carry, budget).

Random weights in the real SDXL 1.0 architectures (bench_gpu.py builds and saves them; speed does not
depend on the values), loaded through the project's own ``Engine.load``. The quality figures compare
pictures of the same request and seed against the plain path: with random weights they say how far a
level moves the numbers, not how a real picture looks. Stages, in this order, each skipped ("skipped:
time") when the budget would not hold it, each recorded as an error without stopping the others;
DIR/results.json is rewritten after every figure:

 1. the card, the versions, and which of the levels' libraries import (with the reason when not)
 2. build and save the refiner and the base (fp16)
 3. stock diffusers, eager: refine 1024x1024 (50 steps x 0.3), and the ensemble (40 steps, split 0.8)
 4. this project, plain (``--speed off``): refine, one UNet call, VAE
 5. each level in ``--levels`` (default compile, draft, fp8, trt), in process, one compile cache shared by all:
    load, start-up cost (the warm-up job's compile, or the TensorRT build until the engine is ready), first
    refine, warm refine (median of 5), one UNet call, peak memory, quality against plain. A level that
    steps down on this machine (library, GPU feature) is recorded as skipped with its one-line reason.
    ``draft`` is the ``compile`` engine with the step cache installed (what ``--speed draft`` sets up), so
    it costs no second compilation.
 6. the ensemble on plain and on each level (the base UNet compiles on first use; draft: the compile
    engine's with the step cache on both UNets)
 7. restart: a new process with each measured level on the warm cache: launch to first result
 8. stock diffusers with ``torch.compile`` of the UNet (fullgraph): first call, refine

With the default budget (480 s) an H100/H200 run gets through about stage 6's plain ensemble and the compile
level's restart (the cold compilations take most of it: 153 s for compile on an H100); ``--skip`` leaves
stages out for a second run, e.g. ``--levels compile,draft --skip stock,stock_ensemble,restart``.

Prints a table and writes DIR/table.md; with --results-dir also <date>-<card>-speed-levels.json/.md there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import (
    ENSEMBLE,
    REFINE,
    Bench,
    build_and_save,
    free_gpu,
    make_image,
    make_request,
    parts,
    quality,
    save_tables,
    stock,
)

LEVELS = ("compile", "draft", "fp8", "trt")
SKIPPABLE = ("stock", "stock_ensemble", "ensemble", "restart", "stock_compiled")
LIBRARIES = ("triton", "torchao", "tensorrt", "onnx", "onnxscript", "diffusers", "zmq")
NOOP = (lambda *a: None, lambda: False)
# Seconds a stage needs at least on an H100/H200 (cold compile 153 s measured 2026-11-26; TensorRT's
# build of the refiner UNet is not measured yet: NVIDIA's demo takes minutes).
NEED = {"compile": 200, "draft": 20, "fp8": 150, "trt": 240, "restart": 60, "ensemble": 25, "ensemble_level": 110,
        "stock_compiled": 150}  # fmt: skip


def libraries() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        t = time.monotonic()
        try:
            mod = importlib.import_module(name)
            out[name] = f"{getattr(mod, '__version__', '?')} (import {time.monotonic() - t:.1f} s)"
        except Exception as exc:  # not installed, or a broken install
            out[name] = f"missing: {type(exc).__name__}: {str(exc)[:200]}"
    return out


def card(b: Bench) -> None:
    import diffusers
    import transformers

    if b.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        b.record("device", props.name)
        b.record("capability", f"{props.major}.{props.minor}")
        b.record("gpu_memory_GiB", round(props.total_memory / 2**30, 1))
    else:
        b.record("device", "cpu (tiny smoke test)")
    b.record("date", str(date.today()))
    b.record("versions", {"torch": torch.__version__, "diffusers": diffusers.__version__,
                          "transformers": transformers.__version__, "python": sys.version.split()[0]})  # fmt: skip
    b.record("libraries", libraries())
    b.record("weights", "random, in the real SDXL 1.0 architectures: quality figures compare numbers, not pictures")


def load_engine(b: Bench, root: Path, speed: str) -> Any:
    from krita_sdxl.backend.engine.sdxl_engine import Engine

    return Engine.load(model=str(root / "refiner"), base_model=str(root / "base"), device=b.device, speed=speed,
                       memory="none", watermark=False, cache_dir=root / "cache",
                       compile_cache=root / "compile-cache")  # fmt: skip


def refine_figures(b: Bench, engine: Any, size: int, state: dict[str, Any], name: str) -> None:
    req = make_request(make_image(size, size), REFINE)
    t = time.monotonic()
    state[f"{name}_image"] = engine.refine(req, *NOOP)
    b.record(f"{name}.first_refine_s", round(time.monotonic() - t, 2))
    b.reset_peak()
    b.record(f"{name}.refine_s", b.timeit(lambda: engine.refine(req, *NOOP), 5 if name != "plain" else 3))
    b.record(f"{name}.refine_peak_GiB", b.peak())
    if name != "plain":
        quality(b, state, f"{name}_image", f"{name}.quality_vs_plain")
    parts(b, engine, size, name)


def plain(b: Bench, root: Path, size: int, state: dict[str, Any]) -> None:
    t = time.monotonic()
    engine = load_engine(b, root, "off")
    b.record("plain.load_s", round(time.monotonic() - t, 1))
    refine_figures(b, engine, size, state, "plain")
    state["engines"]["plain"] = engine


def level(b: Bench, root: Path, size: int, state: dict[str, Any], name: str) -> None:
    """One level: load, start-up, refine, quality. Stepped down on this machine: skipped, with why."""
    from krita_sdxl.backend.speed.levels import choose, probe

    if name == "draft":
        return draft(b, size, state)
    plan = choose(name, probe(b.device, name))  # what Engine.load will choose: skip before loading
    if plan.level != name:
        b.record(f"{name}.status_detail", f"skipped: {plan.summary()}")
        return
    t = time.monotonic()
    engine = load_engine(b, root, name)
    b.record(f"{name}.load_s", round(time.monotonic() - t, 1))
    described = engine.describe()["speed"]
    runs = described.get("level", "off")
    if runs != name:
        why = "; ".join(described.get("level_reasons") or []) or "off on this machine"
        b.record(f"{name}.status_detail", f"skipped: runs as {runs} here: {why}")
        return
    t = time.monotonic()
    warm = engine.warm_up(size)
    b.record(f"{name}.warmup_s", round(time.monotonic() - t, 1) if warm is not None else "failed (see log)")
    startup = time.monotonic() - t
    if name == "trt":
        engines = engine.speed.trt.engines
        left = max(b.left() - 60, 10)
        t = time.monotonic()
        ready = engines.wait(size, size, 2, timeout=left)
        b.record("trt.engine_wait_s", round(time.monotonic() - t, 1))
        startup += time.monotonic() - t
        b.record("trt.engines", engines.status())
        b.record("trt.timings", {f"{k[0]}x{k[1]} b{k[2]}": v for k, v in engines.timings.items()})
        if ready is None:
            raise RuntimeError(f"no engine for {size}x{size}: {engines.status()}")
    b.record(f"{name}.startup_s", round(startup, 1))
    if engine.speed.fallback:
        b.record(f"{name}.status_detail", f"fell back to eager: {engine.speed.fallback[:300]}")
    refine_figures(b, engine, size, state, name)
    b.record(f"{name}.stats", engine.speed.stats())
    state["engines"][name] = engine
    state["restart"].append(name)


def draft(b: Bench, size: int, state: dict[str, Any]) -> None:
    """The compile engine with the step cache added, as ``--speed draft`` sets it up."""
    from krita_sdxl.backend.speed.levels import Plan

    engine = state["engines"].get("compile")
    if engine is None:
        b.record("draft.status_detail", "skipped: needs the compile level's engine (not measured)")
        return
    path = engine.speed
    path.plan = Plan("draft", "draft", compile=True, step_cache=True)
    path._add_step_cache(engine.pipe.unet, "unet")
    b.record("draft.settings", {"interval": path.options.draft_interval, "branch": path.options.draft_branch})
    try:
        refine_figures(b, engine, size, state, "draft")
        b.record("draft.stats", path.stats())
        b.record("draft.startup_s", "as compile (the step cache compiles nothing)")
        state["draft_measured"] = True
    finally:
        path._step_caches.pop("unet").uninstall()
        path.plan = Plan("compile", "compile", compile=True)


CHILD = """
import json, sys, time
t0 = time.monotonic()
sys.path.insert(0, {bench!r})
import torch
from bench_speed_levels import Bench, load_engine, make_image, make_request, REFINE, NOOP
from pathlib import Path
b = Bench(Path({out!r}), 1e9, {device!r})
b.results_name = "restart-{level}.json"
engine = load_engine(b, Path({root!r}), {level!r})
loaded = time.monotonic() - t0
warm = engine.warm_up({size})
if {level!r} == "trt":
    engine.speed.trt.engines.wait({size}, {size}, 2, timeout=300)
req = make_request(make_image({size}, {size}), REFINE)
t = time.monotonic()
engine.refine(req, *NOOP)
print("CHILD " + json.dumps({{"launch_to_loaded_s": round(loaded, 1), "warmup_s": warm and round(warm, 1),
      "launch_to_first_result_s": round(time.monotonic() - t0, 1), "first_refine_s": round(time.monotonic() - t, 2),
      "stats": engine.speed.stats() if engine.speed else None}}, default=str), flush=True)
"""


def restart(b: Bench, root: Path, size: int, state: dict[str, Any]) -> None:
    """A new process per measured level, on the warm compile cache (and the cached engines)."""
    for name in state["restart"]:
        if b.left() < NEED["restart"]:
            b.record(f"restart.{name}", f"skipped: time ({b.left():.0f} s left)")
            continue
        code = CHILD.format(bench=str(Path(__file__).parent), out=str(b.out), device=b.device, level=name,
                            root=str(root), size=size)  # fmt: skip
        env = dict(os.environ, KRITA_SDXL_CACHE=str(root / "cache"))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=max(b.left() - 10, 30))  # fmt: skip
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")), None)
        if line is None:
            b.record(f"restart.{name}", f"error: exit {proc.returncode}: {proc.stderr[-1500:]}")
        else:
            b.record(f"restart.{name}", json.loads(line[len("CHILD ") :]))


def ensembles(b: Bench, size: int, state: dict[str, Any]) -> None:
    image = make_image(size, size)
    for name, engine in list(state["engines"].items()):
        need = NEED["ensemble"] if name in ("plain", "trt") else NEED["ensemble_level"]
        if b.left() < need:
            b.record(f"{name}.ensemble_s", f"skipped: time ({b.left():.0f} s left, {need} s needed)")
            continue
        t = time.monotonic()
        engine.refine(make_request(image, dict(ENSEMBLE, steps=5)), *NOOP)  # loads (and compiles) the base
        b.record(f"{name}.ensemble_first_s", round(time.monotonic() - t, 1))
        b.reset_peak()
        b.record(f"{name}.ensemble_s", b.timeit(lambda: engine.refine(make_request(image, ENSEMBLE), *NOOP), 2))  # noqa: B023
        b.record(f"{name}.ensemble_peak_GiB", b.peak())
        if name == "compile" and state.get("draft_measured"):
            draft_ensemble(b, engine, image)
        engine.unload("base")  # its memory back for the next level
        free_gpu()


def draft_ensemble(b: Bench, engine: Any, image: Any) -> None:
    """The ensemble with the step cache on both UNets (the compile engine, base loaded and compiled)."""
    from krita_sdxl.backend.speed.step_cache import install

    opts = engine.speed.options
    caches = [install(engine.pipe.unet, opts.draft_interval, opts.draft_branch),
              install(engine.models.get("base").unet, opts.draft_interval, opts.draft_branch)]  # fmt: skip
    try:
        b.record("draft.ensemble_s", b.timeit(lambda: engine.refine(make_request(image, ENSEMBLE), *NOOP), 2))
    finally:
        for cache in caches:
            cache.uninstall()


def stock_compiled(b: Bench, pipes: dict[str, Any], size: int) -> None:
    refiner = pipes["refiner"]
    dev = b.device
    image = torch.rand(1, 3, size, size, generator=torch.Generator(dev).manual_seed(0), device=dev)
    torch._dynamo.reset()
    refiner.unet = torch.compile(refiner.unet, fullgraph=True)

    def refine(steps: int = 50) -> Any:
        return refiner(REFINE["prompt"], negative_prompt=REFINE["negative_prompt"], image=image, strength=0.3,
                       num_inference_steps=steps, guidance_scale=5.0, output_type="np",
                       generator=torch.Generator(dev).manual_seed(1))  # fmt: skip

    t = time.monotonic()
    refine(steps=10)
    b.record("stock_compiled.first_call_s", round(time.monotonic() - t, 1))
    b.record("stock_compiled.refine_s", b.timeit(refine, 3))


# --- report ----------------------------------------------------------------------------------------------


def table(r: dict[str, Any], levels: list[str], size: int) -> str:
    def v(key: str, unit: str = "") -> str:
        x = r.get(key)
        if x is None:
            return ""
        if isinstance(x, float):
            return f"{x:.3f}{unit}" if x < 10 else f"{x:.1f}{unit}"
        return str(x)

    def q(name: str) -> str:
        x = r.get(f"{name}.quality_vs_plain")
        return f"{x['psnr_db']} dB / {x['max_abs_diff']}" if isinstance(x, dict) else ""

    def status(name: str) -> str:
        detail = r.get(f"{name}.status_detail")
        return detail if detail else (r.get(f"{name}.status") or r.get(f"{name}.status_detail") or "not run")

    def restart(name: str) -> str:
        x = r.get(f"restart.{name}")
        return f"{x['launch_to_first_result_s']} s" if isinstance(x, dict) else (str(x)[:60] if x else "")

    lines = [
        f"# --speed levels, {r.get('device')} (compute capability {r.get('capability', '?')}), {r.get('date')}",
        "",
        f"Random weights in the real SDXL 1.0 architectures; {r.get('versions')}. Refine {size}x{size}, 50 steps x 0.3 "
        "(15 UNet calls), engine call in process (ZeroMQ adds about 12 ms, 2026-11-26); quality = PSNR / max "
        "difference (0-255) against plain, same seed (random weights: how far the numbers move, not picture "
        "quality).",
        "",
        "| path | refine | UNet call | start-up (cold) | restart to first result | quality vs plain | ensemble | "
        "peak GiB | status |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| stock diffusers, eager | {v('stock.refine_s', ' s')} | | | | | {v('stock.ensemble_s', ' s')} | "
        f"{v('stock.refine_peak_GiB')} | {status('stock')} |",
        f"| stock diffusers, torch.compile | {v('stock_compiled.refine_s', ' s')} | | "
        f"{v('stock_compiled.first_call_s', ' s')} (first call) | | | | | {status('stock_compiled')} |",
        f"| this project, plain (off) | {v('plain.refine_s', ' s')} | {v('plain.unet_call_s', ' s')} | | | | "
        f"{v('plain.ensemble_s', ' s')} | {v('plain.refine_peak_GiB')} | {status('plain')} |",
    ]
    for name in levels:
        lines.append(
            f"| --speed {name} | {v(f'{name}.refine_s', ' s')} | {v(f'{name}.unet_call_s', ' s')} | "
            f"{v(f'{name}.startup_s', ' s')} | {restart(name)} | {q(name)} | {v(f'{name}.ensemble_s', ' s')} | "
            f"{v(f'{name}.refine_peak_GiB')} | {status(name)} |"
        )
    lines += ["", "Goals: refine 0.55 s (request to result), ensemble 1.5 s.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test of this script)")
    ap.add_argument("--budget", type=float, help="seconds; stages that would not fit are skipped (480; tiny: 900)")
    ap.add_argument("--levels", default=",".join(LEVELS), help="comma-separated, in order (default: %(default)s)")
    ap.add_argument("--results-dir", type=Path, help="also write <date>-<card>-speed-levels.json/.md here")
    ap.add_argument("--skip", default="", help=f"comma-separated stages to leave out: {', '.join(SKIPPABLE)}")
    args = ap.parse_args()
    skip = {x for x in args.skip.split(",") if x}
    if skip - set(SKIPPABLE):
        ap.error(f"unknown stages {sorted(skip - set(SKIPPABLE))}; choose from {', '.join(SKIPPABLE)}")
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [x for x in args.levels.split(",") if x]
    unknown = set(levels) - set(LEVELS)
    if unknown:
        ap.error(f"unknown levels {sorted(unknown)}; choose from {', '.join(LEVELS)}")
    if args.tiny:  # one thread: tiny tensors; compile with dynamo's eager backend (no code generation)
        torch.set_num_threads(1)
        os.environ["KRITA_SDXL_SPEED_OPTIONS"] = json.dumps({"backend": "eager"})
    budget = args.budget or (900.0 if args.tiny else 480.0)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    size = 128 if args.tiny else 1024
    b = Bench(args.out, budget, device)
    root = Path(tempfile.mkdtemp(prefix="bench-levels-"))
    os.environ["KRITA_SDXL_CACHE"] = str(root / "cache")
    state: dict[str, Any] = {"engines": {}, "restart": []}
    pipes: dict[str, Any] = {}
    b.stage("card", 0, lambda: card(b))
    if b.stage("build", 0, lambda: pipes.update(build_and_save(b, root, args.tiny, dtype))):
        if "stock" not in skip:
            b.stage("stock", 30, lambda: stock(b, pipes, size))
        if "stock_ensemble" not in skip:
            b.stage("stock_ensemble", 25, lambda: stock(b, pipes, size, ensemble_only=True))
    if "stock_compiled" in skip:
        pipes.clear()  # their GPU memory back
        free_gpu()
    b.stage("plain", 30, lambda: plain(b, root, size, state))
    for name in levels:
        b.stage(name, 0 if args.tiny else NEED[name], lambda n=name: level(b, root, size, state, n))  # type: ignore[misc]
    if "ensemble" not in skip:
        b.stage("ensemble", 0 if args.tiny else NEED["ensemble"], lambda: ensembles(b, size, state))
    state["engines"].clear()
    free_gpu()
    if "restart" not in skip:
        b.stage("restart", 0 if args.tiny else NEED["restart"], lambda: restart(b, root, size, state))
    if pipes:
        b.stage("stock_compiled", 0 if args.tiny else NEED["stock_compiled"], lambda: stock_compiled(b, pipes, size))
    pipes.clear()
    b.record("total_s", round(time.monotonic() - b.t0, 1))
    save_tables(args, b.results, table(b.results, levels, size), device, "speed-levels")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
