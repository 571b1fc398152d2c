"""Issue 20, item 2: a layer whose upload took longer than the heartbeat timeout was cut off mid-frame,
and neither side said anything (96 MiB at 20 MB/s). Pixels now travel in 1 MiB chunks under credit.

The real command through a real throttling TCP proxy (tests/throttle.py) to a real `serve` subprocess:
6.25 MiB up at 1.5 MB/s takes about 4.4 s, longer than the 3 s heartbeat timeout for one frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import krita_sdxl
from PIL import Image as PILImage
from throttle import ThrottleProxy

from krita_sdxl.backend.cli.launcher import start_service


@pytest.mark.slow
def test_a_layer_slower_than_the_heartbeat_timeout_goes_through_with_upload_progress(tmp_path: Path):
    pixels = np.random.default_rng(7).integers(0, 256, (1280, 1280, 4), dtype=np.uint8)
    PILImage.fromarray(pixels, "RGBA").save(tmp_path / "layer.png", compress_level=0)
    svc = start_service(["--identity", "--log-level", "warning"])
    try:
        port = int(svc.endpoint.rsplit(":", 1)[1])
        with ThrottleProxy("127.0.0.1", port, rate=1_500_000, rate_down=4_000_000) as proxy:
            proc = krita_sdxl(
                "refine", str(tmp_path / "layer.png"), "-o", str(tmp_path / "out.png"),
                "--endpoint", proxy.endpoint, "--timeout", "20", "--steps", "2", timeout=120,
            )  # fmt: skip
            assert proc.returncode == 0, (proc.stdout, proc.stderr, svc.log)
            assert proxy.bytes_up > 1280 * 1280 * 4  # it really went through the slow link
        assert "upload" in proc.stderr and "MB" in proc.stderr  # the upload's progress bar, in bytes
        out = np.asarray(PILImage.open(tmp_path / "out.png").convert("RGBA"))
        assert np.array_equal(out, pixels)  # every byte arrived, both ways (the identity engine)
    finally:
        assert svc.stop() == 0, svc.log
