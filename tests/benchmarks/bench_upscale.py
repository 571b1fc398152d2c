"""Upscale-refine time per speed level: a 1024x1024 picture upscaled 2x to 2048x2048 and refined (strength 0.3,
50 steps: 15 denoising steps in each of 9 tiles of 1024 px), on the real SDXL refiner architecture with random
weights (speed and memory do not depend on the weight values).

    python tests/benchmarks/bench_upscale.py --out DIR [--levels off,compile,trt,fp8,draft] [--results-dir D]
    python tests/benchmarks/bench_upscale.py --tiny --out DIR --levels off   # toy widths on the CPU: smoke test

``bench_gpu.py --upscale-levels off,compile`` runs :func:`upscale_levels` as a stage of its own run (the models
it built already, its budget). Each level loads the engine with ``speed`` set to it, runs one warm-up upscale
(the compilation, for the compiled levels), then times two upscales; per level it records the time, the
peak GPU memory, the level that ran (a level that cannot run steps down and says why) and, against the
``off`` level's picture, the PSNR. Prepared without a GPU (none was lent to issue 23): only ``--tiny`` has run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import Bench, build_and_save, free_gpu, make_image, save_tables

LEVELS = ("off", "compile", "trt", "fp8", "draft")
UPSCALE = dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="blurry", strength=0.3,
               steps=50, guidance_scale=5.0, seed=1)  # fmt: skip


def upscale_request(image: Any, factor: int = 2) -> Any:
    from krita_sdxl.backend.engine.request import RefineRequest
    from krita_sdxl.protocol.upscale import UpscaleSpec, plan_steps

    spec = image.spec
    return RefineRequest(
        image=image, prompt=UPSCALE["prompt"], negative_prompt=UPSCALE["negative_prompt"],
        strength=UPSCALE["strength"], plan=plan_steps(UPSCALE["steps"], UPSCALE["strength"]), seed=UPSCALE["seed"],
        guidance_scale=UPSCALE["guidance_scale"], aesthetic_score=6.0, negative_aesthetic_score=2.5,
        upscale=UpscaleSpec(spec.width * factor, spec.height * factor, "lanczos"),
    )  # fmt: skip


def psnr(a: Any, b: Any) -> float:
    x = np.frombuffer(bytes(a.data), np.uint8).astype(np.float64)
    y = np.frombuffer(bytes(b.data), np.uint8).astype(np.float64)
    mse = float(np.mean((x - y) ** 2))
    return round(99.0 if mse == 0 else 10 * np.log10(255**2 / mse), 2)


def upscale_levels(
    b: Bench, root: Path, size: int, levels: tuple[str, ...] = ("off", "compile"), tile: int = 1024
) -> None:
    """Time ``size`` -> 2 x ``size`` upscale-refines at each speed level (``root``: the saved models)."""
    from krita_sdxl.backend.engine.sdxl_engine import Engine
    from krita_sdxl.backend.engine.tiling import TilingConfig

    req = upscale_request(make_image(size, size))
    noop = (lambda *a: None, lambda: False)
    reference = None
    for level in levels:
        key = f"upscale.{level}"
        if b.left() < (240 if level in ("compile", "trt", "fp8", "draft") and b.device == "cuda" else 20):
            b.record(f"{key}.status", f"skipped: time ({b.left():.0f} s left)")
            continue
        engine = None
        try:
            t = time.monotonic()
            cache = {"cache_dir": root / "cache", "compile_cache": root / "compile-cache"}
            engine = Engine.load(model=str(root / "refiner"), device=b.device, speed=level, memory="none",
                                 watermark=False, **cache)  # fmt: skip
            engine.tiling = TilingConfig(threshold=tile * tile, tile=tile, overlap=tile // 8)
            calls: list[int] = []
            first = engine.refine(req, lambda _step, total, _p, seen=calls: seen.append(total), noop[1])
            b.record(f"{key}.first_s", round(time.monotonic() - t, 1))
            b.record(f"{key}.unet_calls", calls[-1] if calls else 0)
            b.record(f"{key}.ran_as", engine.speed.describe() if engine.speed is not None else {"enabled": False})
            b.reset_peak()
            b.record(f"{key}.seconds", b.timeit(lambda e=engine: e.refine(req, *noop), 2))
            b.record(f"{key}.peak_GiB", b.peak())
            if reference is None:
                reference = first
            else:
                b.record(f"{key}.psnr_vs_off_dB", psnr(first, reference))
        except Exception as exc:  # one level failing must not lose the others
            b.record(f"{key}.error", f"{type(exc).__name__}: {str(exc)[:400]}")
        finally:
            engine = None
            torch._dynamo.reset()
            free_gpu()


def table(results: dict[str, Any], levels: tuple[str, ...], size: int) -> str:
    rows = [f"| level | {size} -> {2 * size} upscale-refine | peak GPU memory | UNet calls | PSNR vs off |",
            "|---|---|---|---|---|"]  # fmt: skip
    for level in levels:
        k = f"upscale.{level}"
        seconds = results.get(f"{k}.seconds")
        time_text = f"{seconds} s" if seconds is not None else results.get(f"{k}.error") or results.get(f"{k}.status")
        rows.append(
            f"| {level} | {time_text or '-'} | {results.get(f'{k}.peak_GiB', '-')} GiB"
            f" | {results.get(f'{k}.unet_calls', '-')} | {results.get(f'{k}.psnr_vs_off_dB', '-')} |"
        )
    return "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="toy widths on the CPU (smoke test of this script)")
    ap.add_argument("--levels", default="off,compile", help=f"comma-separated, of {', '.join(LEVELS)}")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; levels that would not fit are skipped")
    ap.add_argument("--results-dir", type=Path, help="also write <date>-<card>-upscale.json/.md here")
    args = ap.parse_args()
    levels = tuple(v.strip() for v in args.levels.split(",") if v.strip())
    unknown = [v for v in levels if v not in LEVELS]
    if unknown:
        ap.error(f"unknown levels {unknown}; known: {', '.join(LEVELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:  # tiny tensors: one thread avoids OpenMP spinning on a busy machine
        torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    b = Bench(args.out, args.budget, device)
    b.record("device", torch.cuda.get_device_name() if device == "cuda" else "cpu (tiny smoke test)")
    size, tile = (64, 64) if args.tiny else (1024, 1024)
    root = Path(tempfile.mkdtemp(prefix="bench-upscale-"))
    try:
        build_and_save(b, root, args.tiny, torch.float16 if device == "cuda" else torch.float32)
        free_gpu()
        upscale_levels(b, root, size, levels, tile)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save_tables(args, b.results, table(b.results, levels, size), device, "upscale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
