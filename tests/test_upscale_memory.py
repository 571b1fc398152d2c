"""Peak memory of an upscale to 4096x4096 on the CPU demo, in a fresh process.

Budget (stated in README.md): the job's peak RSS stays under 1.5 GiB, and above the peak of a one-tile
upscale (512 -> 1024 px) in the same process by no more than what the picture itself adds: the result's
buffer (width x height x 4 bytes for RGBA8), the band of one row of tiles the decoded tiles are blended in
(width x tile x 12 bytes) and the source, plus 64 MiB for the allocator. Without a fixed mmap threshold
(backend/engine/upscale.py) glibc's heap made it grow with the number of tiles: +248 MiB here. The
models' working set is that of one 1024 px tile, whatever the picture. Tiles of 1024 px without overlap
(16 of them: the memory is the same with an overlap, the run shorter); one denoising step without
guidance, to keep a CPU run short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

MiB = 2**20
TILE = 1024
ABSOLUTE = 1536 * MiB
SLACK = 64 * MiB

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from krita_sdxl.backend.engine.sdxl_engine import Engine
    from krita_sdxl.backend.engine.request import RefineRequest
    from krita_sdxl.backend.engine.tiling import TilingConfig
    from krita_sdxl.protocol import Image, ImageSpec
    from krita_sdxl.protocol.upscale import UpscaleSpec, plan_steps

    def peak():  # this process's own high-water mark (ru_maxrss would start at the parent's RSS at fork)
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024

    engine = Engine.load(demo=True, device="cpu", dtype="fp32", speed="off", memory="none", watermark=False,
                         cache_dir=Path(sys.argv[1]))  # the suite's demo model: loaded, never built here
    engine.tiling = TilingConfig(threshold=TILE * TILE, tile=TILE, overlap=0)
    out = {"loaded": peak()}
    for name, side in (("one_tile", 512), ("picture", 2048)):
        rng = np.random.default_rng(0)
        image = Image(ImageSpec(side, side, "BGRA", 8), rng.integers(0, 256, (side, side, 4), np.uint8).tobytes())
        req = RefineRequest(image=image, prompt="", negative_prompt="", strength=0.25, plan=plan_steps(4, 0.25),
                            seed=1, guidance_scale=1.0, aesthetic_score=6.0, negative_aesthetic_score=2.5,
                            upscale=UpscaleSpec(2 * side, 2 * side, "lanczos"))
        t = time.monotonic()
        result = engine.refine(req, lambda *a: None, lambda: False)
        assert (result.spec.width, result.spec.height) == (2 * side, 2 * side)
        out[name] = {"peak": peak(), "seconds": round(time.monotonic() - t, 1), "side": 2 * side}
        del result
    print(json.dumps(out))
    """
).replace("TILE", str(TILE))


def buffers(side: int) -> int:
    """What a side x side RGBA8 result adds besides the models: its buffer, one band of tile rows, and the
    source (half the side: as a numpy array and as the bytes the request holds)."""
    return side * side * 4 + side * TILE * 12 + 2 * (side // 2) ** 2 * 4


@pytest.mark.timeout(1500)  # 16 tiles of 1024 px on one CPU thread: about 3 minutes on a quiet machine, 7 on a busy one
def test_an_upscale_to_4096_px_stays_in_its_memory_budget(demo_models) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # no OpenMP spinning on a busy machine
    cache = demo_models.refiner.parents[1]  # the folder that holds demo-v1/
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(cache)], capture_output=True, text=True, timeout=1400,
                         env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    one, big = found["one_tile"], found["picture"]
    grown = big["peak"] - one["peak"]
    allowed = buffers(big["side"]) - buffers(one["side"]) + SLACK
    print(
        f"peak RSS: loaded {found['loaded'] / MiB:.0f} MiB; 1024x1024 upscale {one['peak'] / MiB:.0f} MiB "
        f"({one['seconds']} s); 4096x4096 {big['peak'] / MiB:.0f} MiB ({big['seconds']} s): "
        f"+{grown / MiB:.0f} MiB for the picture, {allowed / MiB:.0f} MiB allowed"
    )
    assert big["peak"] < ABSOLUTE
    assert grown <= allowed
