"""Issue 22 end to end: live refine in real Krita 5 under Xvfb (``krita_driver/scenario_live.py``), the
``--no-vendor`` plugin zip against a real demo backend (``krita-sdxl serve --demo``). One Krita start.

The scenario clicks Live on, paints 5 strokes (4 through the Krita API, 1 with the mouse and Krita's brush)
with pauses shorter and longer than a job, and reports; here: one preview layer at every moment, superseded
jobs cancelled by the service (its events and its log), the undo stack not grown by the updates, Apply, Live
off, Source: Image not capturing the preview, and the final preview equal, pixel for pixel, to a normal
refine of the final painting with the same seed and the live settings, run here through the same backend
without ``live``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import krita_harness
import pytest

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.protocol import Image, ImageSpec
from krita_sdxl.protocol.policy import capped_steps

build_plugin = krita_harness.load_build_plugin()
pytestmark = [pytest.mark.krita, pytest.mark.slow]

W, H = 320, 240
SETTINGS = {"prompt": "a harbour at dusk, oil on canvas", "strength": 0.5, "steps": 40, "seed": -1, "source": "layer",
            "live_calls": 16, "live_wait_ms": 150, "preview": False}  # fmt: skip


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from krita_sdxl.backend.cli.launcher import start_service

    cache = tmp_path_factory.mktemp("demo-model")
    # One torch thread: on a 2-core machine a busy backend must not starve Krita's UI thread.
    service = start_service(["--demo", "--cache-dir", str(cache), "--log-level", "info"], timeout=180,
                            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # fmt: skip
    try:
        yield service
    finally:
        service.stop()


def test_live_refine_in_real_krita(tmp_path: Path, backend: Any) -> None:
    krita_harness.require_krita()
    zip_path = build_plugin.build(tmp_path / "krita_sdxl_refiner.zip", vendor=False)
    files = tmp_path / "files"
    run = krita_harness.run_krita(
        "scenario_live",
        tmp_path / "krita",
        name="e2e-live",
        params={"width": W, "height": H, "out_dir": str(files), "timeout_s": 120},
        plugin_zips=[zip_path],
        settings={"krita_sdxl": {"endpoint": backend.endpoint, **SETTINGS}},
        timeout_s=420,
        scenario_timeout_s=380,
    )
    value = run.check()
    story = run.describe() + f"\nscenario value: {value}\n--- backend log ---\n{backend.log[-3000:]}"
    assert run.result is not None and run.result["uncaught"] == [], story
    assert not [m for m in value["messages"] if "Internal error" in m or m.startswith("error")], story

    # one preview layer, directly above the source, the source still the layer painted on
    assert value["live_counts"]["min"] == value["live_counts"]["max"] == 1, story
    assert value["preview_above_source"] and value["active_after_on"] == value["active_after_updates"] == "Source"
    assert value["layer_count"]["live"] == value["layer_count"]["before"] + 1, story

    # newest wins: superseded jobs were stopped or dropped by the service, which says so
    assert value["superseded"] >= 1, story
    in_log = re.findall(r"superseded by|cancelled \(superseded\)", backend.log)  # queued | running ones
    assert len(in_log) >= value["superseded"], story

    # updates in place: the undo stack holds the one "Add Layer" of Live on (and the brush stroke's step),
    # whatever the updates
    undo = value["undo"]
    assert value["mouse_strokes"] == 1, story
    assert undo["after_on"] == undo["before"] + 1 and undo["after_updates"] == undo["after_on"] + 1, story
    assert value["updates"] >= 3, story

    # the final preview IS a normal refine of the final painting, with the same seed and live settings
    final = value["final"]
    assert final["captured_is_final_painting"] and value["preview_differs_from_painting"], story
    _x, _y, w, h = final["crop"]
    painting = (files / "painting.bgra").read_bytes()
    fields = dict(final["fields"])
    assert fields["seed"] == final["seed"] and fields["mode"] == "refine", fields
    assert fields["steps"] == capped_steps(40, 0.5, 16) and fields["work_width"] == W, fields
    with ServiceClient(backend.endpoint, timeout=120) as client:
        normal = client.run(Image(ImageSpec(w, h, "BGRA", 8), painting), **fields)
    assert bytes(normal.images["image"].data) == (files / "preview.bgra").read_bytes(), story

    # Apply: a normal layer equal to the preview, one history entry and one undo step; Live off
    apply = value["apply"]
    assert len(apply["layers"]) == 1 and apply["equal_to_preview"] and apply["history_added"] == 1, story
    assert apply["undo"] == undo["after_updates"] + 1 and apply["active"] == "Source", story
    order = apply["order"]
    assert order.index("Live preview") == order.index(apply["layers"][0]) + 1 == order.index("Source") + 2, story
    assert value["after_off"]["previews"] == 0 and not value["after_off"]["on"], story
    assert value["source_unchanged_by_plugin"], story

    # Source: Image: the preview on top is never part of what is captured
    image = value["image"]
    assert image["preview_on_top"] and image["captured_is_painting"] and image["captured_is_not_visible"], story
    assert image["previews_after_off"] == 0, story
    ui = value["ui"]
    assert value["slow_plugin_calls"] == [], story  # no call of the plugin held Krita's UI thread 50 ms
    print(
        f"live E2E: first job {value['first']['job_s']} s, latency {value['first']['latency_s']} s, "
        f"{value['updates']} updates, {value['superseded']} superseded, pauses {value['pauses_s']} s; UI thread: "
        f"largest gap {ui['max_gap_ms']} ms, p99 {ui['p99_gap_ms']} ms; the plugin's own calls at most "
        f"{value['plugin_calls_max_ms']} ms; Krita run {run.duration_s:.0f} s"
    )
