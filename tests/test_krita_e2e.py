"""End to end: the packaged plugin inside real Krita 5 under Xvfb, against real backends.

A demo backend (``krita-sdxl serve --demo``: tiny random weights, CPU) serves jobs. Two Krita runs:

- the docker (``krita_driver/scenario_docker.py``), with the ``--no-vendor`` zip on Debian's
  python3-zmq and python3-msgpack, on a 1280x720 screen (a laptop): Krita's window with its default
  dockers and this one fits the screen; every control is clicked with the mouse on the docker's own
  widgets (Run, Again, per-job Cancel, Cancel, Apply, Open, Discard, Start/Stop backend, Resubmit, the
  ⚙ dialog's OK/Apply/Cancel), the prompt and the endpoint are typed; three quick Runs stack newest on
  top on the canvas; the UI thread's largest stall while a job runs, and while a 6000x4000 layer is
  captured, is printed; screenshots go to tests/artifacts/ (``e2e-docker-*.png``);
- the vendored zip Linux users get (``krita_driver/scenario_refine.py``): the menu action refines
  a selection.

Set ``KRITA_SDXL_E2E_ENDPOINT`` to use an already running backend (a real GPU one, say) instead of
starting the demo, and ``KRITA_SDXL_E2E_SCREEN`` for another screen (``1600x1000x24`` makes the
README's docs/docker.png: ``e2e-docker-docker-after.png``).
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import krita_harness
import pytest

ROOT = Path(__file__).resolve().parent.parent
build_plugin = krita_harness.load_build_plugin()
require_krita = krita_harness.require_krita

SEED = 424242
PROMPT = "a lighthouse on a cliff at dawn"
SETTINGS = {"prompt": "a detailed test pattern", "strength": 0.5, "steps": 4, "seed": SEED, "source": "layer"}
RECT = (100, 120, 300, 260)  # x0, y0, x1, y1 for the menu-action run
DOCKER_RECT = (470, 300, 240, 260)  # x, y, w, h: partly off the 640x480 canvas
MAX_UI_GAP_MS = 1000.0  # a stall this long is a bug even on a busy 2-core CI machine; the figure is printed
MAX_CAPTURE_WORK_MS = 250.0  # the plugin's own work on the UI thread for a 6000x4000 capture (it was 0.7-0.9 s)
SCREEN = os.environ.get("KRITA_SDXL_E2E_SCREEN", "1280x720x24")  # a laptop's screen: the docker must fit

pytestmark = [pytest.mark.krita, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-model")


@pytest.fixture(scope="module")
def backend_endpoint(demo_cache: Path) -> Iterator[str]:
    endpoint = os.environ.get("KRITA_SDXL_E2E_ENDPOINT")
    if endpoint:
        yield endpoint
        return
    from krita_sdxl.backend.cli.launcher import start_service

    # One torch thread: on a 2-core CI machine a busy backend must not starve Krita's UI thread.
    service = start_service(
        ["--demo", "--cache-dir", str(demo_cache), "--log-level", "info"],
        timeout=180,
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    try:
        yield service.endpoint
    finally:
        service.stop()
        print("--- backend log ---\n" + service.log[-4000:])


def run_scenario(
    scenario: str,
    zip_path: Path,
    endpoint: str,
    workdir: Path,
    name: str,
    params: dict[str, Any],
    timeout_s: float,
    screen: str = "1600x1000x24",
) -> tuple[krita_harness.KritaRun, dict[str, Any]]:
    run = krita_harness.run_krita(
        scenario,
        workdir,
        name=name,
        params=params,
        plugin_zips=[zip_path],
        settings={"krita_sdxl": {"endpoint": endpoint, "preview": True, **SETTINGS}},
        timeout_s=timeout_s,
        scenario_timeout_s=timeout_s - 30,
        extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},  # for the backend the docker starts
        screen=screen,
    )
    return run, run.check()


@pytest.mark.timeout(780)  # one Krita run of every phase: 3 to 6 minutes on a 2-core machine shared with others
def test_docker_in_real_krita(tmp_path: Path, backend_endpoint: str, demo_cache: Path) -> None:
    require_krita()
    zip_path = build_plugin.build(tmp_path / "krita_sdxl_refiner.zip", vendor=False)
    params = {
        "rect": list(DOCKER_RECT),
        "prompt": PROMPT,
        "good_endpoint": backend_endpoint,
        "dead_endpoint": f"tcp://127.0.0.1:{free_port()}",
        "local_endpoint": f"tcp://127.0.0.1:{free_port()}",
        "python": sys.executable,
        "backend_args": f"serve --demo --cache-dir {demo_cache} --log-level info",
        "timeout_s": 90,
    }
    run, value = run_scenario("scenario_docker", zip_path, backend_endpoint, tmp_path / "krita", "e2e-docker",
                              params, timeout_s=570, screen=SCREEN)  # fmt: skip
    story = run.describe() + f"\nscenario value: {value}"
    assert run.result is not None and run.result["uncaught"] == [] and value["internal_errors"] == [], story

    lay = value["layout"]  # item 1: Krita with its default dockers and this one fits a laptop's screen
    screen_w, screen_h = lay["screen"]
    assert lay["window"][3] <= screen_h and lay["window"][2] <= screen_w, f"Krita's window is off the screen\n{story}"
    assert lay["status_bar"] and lay["status_bottom"] < screen_h, f"the status bar is off the screen\n{story}"
    assert not lay["floating"] and lay["docker"][1] + lay["docker"][3] <= screen_h, f"docker off screen\n{story}"
    assert lay["docker_min"][1] <= 300, f"the docker's minimum height is {lay['docker_min'][1]} px\n{story}"
    assert value["advanced_visible"] and value["advanced_field_width"] >= 60, f"advanced settings squeezed\n{story}"

    first = value["first"]
    assert PROMPT[:20] in first["name"] and first["directly_above"] and first["visible"], story
    assert first["name"].startswith(f"#1 · seed {SEED} · "), story  # item 5: what tells layers apart, first
    assert value["run_button"][0] == "Run" != value["run_button"][1], story
    x, y = DOCKER_RECT[:2]
    bx, by, bw, bh = first["bounds"]
    assert bx >= x - 1 and by >= y - 1 and bx + bw <= 640 and by + bh <= 480, f"layer not clipped to canvas\n{story}"
    assert first["alpha"]["outside_nonzero"] == 0 and first["alpha"]["inner_min"] > 0, story
    assert value["source_unchanged"], f"the Source layer changed\n{story}"
    assert value["first_row"]["thumbnail"] and f"seed {SEED}" in value["first_row"]["detail"], story
    assert any(m.startswith("Added layer") and "docker-e2e" in m for m in value["messages_after_refine"]), story

    assert value["active_after_refine"] == first["name"], story  # Krita made the result active...
    again = value["again"]
    assert again["directly_above"] and again["captures"] == 0, f"Again re-read the document\n{story}"
    assert again["name"] != first["name"], story  # ...yet Again ran the captured pixels, with a new seed

    stack = value["stack"]  # item 2: three quick Runs stack newest on top, and the canvas shows the newest
    assert stack["positions"] == sorted(stack["positions"]) and stack["numbers"] == sorted(stack["numbers"]), story
    assert stack["positions"][0] > stack["source_position"] and stack["others_below"], story
    assert stack["positions"] == list(range(stack["positions"][0], stack["positions"][0] + 3)), story
    assert stack["opaque_newest"] and stack["layers_differ"], story
    assert stack["canvas_is_newest"] and not stack["canvas_is_oldest"], f"the canvas shows an older result\n{story}"

    empty = value["empty"]  # an empty layer: refused with the reason, nothing sent, nothing added
    assert empty["new_jobs"] == 0 and empty["new_layers"] == [], story
    assert any(m.startswith("Nothing to refine: layer “Empty”") for m in empty["messages"]), story

    assert value["queue"] == {
        "after_row_cancel": ["cancelled", "waiting"],
        "after_cancel": ["cancelled", "cancelled"],
        "rows_left": 0,
    }, story
    row_line, button_line = value["queue_messages"]  # item 3: a cancel leaves a line in the log
    assert row_line.startswith("Cancelled: “#") and row_line.endswith("” before it was sent."), story
    assert button_line.startswith("Cancelled: “#") and button_line != row_line, story
    line = value["connection_line"]  # item 5: cut with "…", the whole text in the tooltip
    assert line["full"].startswith("disconnected — no answer from") and line["full"] in line["tooltip"], story
    assert line["text_width"] <= line["width"], story
    assert line["shown"] == line["full"] or line["shown"].endswith("…"), story

    dialog = value["dialog"]  # item 7: Qt's dialog conventions
    assert "cpu" in dialog["backend_connected"] and not dialog["repair_enabled"], story
    invalid = dialog["invalid"]
    assert (
        not invalid["ok_enabled"]
        and invalid["still_open"]
        and "did you mean tcp://localhost:5588" in invalid["problem"]
    ), story
    assert invalid["saved"] == dialog["saved_first"] == dialog["after_cancel"]["saved"], story
    assert not dialog["after_cancel"]["open"] and dialog["reopened_field"] == dialog["saved_first"], story
    assert dialog["open_after_apply"] and "none connected" in dialog["backend_after_apply"], story

    kept = value["kept"]
    assert not kept["applied"] and "closed" in kept["note"] and kept["message"], story
    assert len(kept["apply"]) == 1 and kept["open"]["size"] and len(kept["open"]["layers"]) == 1, story
    assert kept["row_after_discard"] is False, story

    local = value["local"]
    assert local["started"] == "■ Stop" and local["resubmit_visible"], story
    assert ("stopped" if local["lost_at_stop"] else "no longer has this job") in local["lost"], story
    assert len(local["layers"]) == 1, story
    assert local["resubmitted_seed"] == local["lost_seed"] is not None, story  # item 8: as captured, seed included
    assert f"seed {local['lost_seed']}" in local["layers"][0], story

    big = value["big"]  # item 4: a 6000x4000 layer is captured off the UI thread
    print(
        f"docker E2E, {big['size'][0]}x{big['size'][1]} layer: sent after {big['sent_s']} s; UI thread: largest gap "
        f"between 10 ms ticks {big['max_gap_ms']} ms (idle before: {big['idle_max_gap_ms']} ms), top "
        f"{big['top_gaps_ms']}; the click {big['click_ms']} ms; the plugin's work on the UI thread (ms): "
        f"{big['plugin_worst_ms']}; reads [on the UI thread, pixels, ms]: {big['reads']}"
    )
    assert big["state"] == "cancelled", story
    reads = [on_ui for on_ui, pixels, _ms in big["reads"] if pixels == 6000 * 4000]
    assert reads == [False], f"the 6000x4000 layer was read on the UI thread\n{story}"
    assert max(big["plugin_worst_ms"].values()) < MAX_CAPTURE_WORK_MS, story

    ui = value["measure"]["ui"]
    print(
        f"docker E2E: layer after {value['measure']['time_to_layer_s']} s; UI thread: largest gap between 10 ms "
        f"ticks {ui['max_gap_ms']} ms at {ui['worst_at_s']} s, p99 {ui['p99_gap_ms']} ms, {ui['over_100ms']} over "
        f"100 ms, top {ui['top_gaps_ms']}; idle before the click: largest gap {ui['idle']['max_gap_ms']} ms; "
        f"plugin work on the UI thread (ms): {ui['probe_worst_ms']}; full docker repaint {lay['repaint_ms']} ms; "
        f"docker {lay['docker']} (minimum {lay['docker_min']}) on a {lay['screen']} screen, window {lay['window']}, "
        f"panel minimum {lay['panel_min']}; "
        f"Krita run {run.duration_s:.0f} s"
    )
    assert ui["max_gap_ms"] < MAX_UI_GAP_MS, f"Krita's UI thread stalled\n{story}"


def test_vendored_zip_refines_from_the_menu_action(tmp_path: Path, backend_endpoint: str) -> None:
    """The zip Linux users get, with the manylinux wheels (downloaded once into build/wheels)."""
    require_krita()
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip("the vendored zip carries manylinux x86_64 wheels only")
    zip_path = build_plugin.build(tmp_path / "krita_sdxl_refiner.zip", vendor=True, platforms=["*-manylinux_x86_64"])
    params = {"rect": list(RECT), "inner_margin": 20, "timeout_s": 60, "action": "krita_sdxl_refine"}
    run, value = run_scenario("scenario_refine", zip_path, backend_endpoint, tmp_path / "krita", "e2e-refine-vendored",
                              params, timeout_s=150)  # fmt: skip
    story = run.describe() + f"\nscenario value: {value}"
    py = run.result["python_version"].split(".")
    assert f"/krita_sdxl_refiner/_vendor/cp{py[0]}{py[1]}-manylinux_x86_64/zmq/" in value["modules"]["zmq"], story
    assert "/krita_sdxl_refiner/_vendor/common/krita_sdxl/protocol/" in (value["modules"]["krita_sdxl.protocol"] or "")
    assert run.result["uncaught"] == [], story
    assert [t for _n, t in value["new_nodes"]] == ["paintlayer"], f"expected exactly one new paint layer\n{story}"
    layer = value["layer"]
    assert layer["name"].startswith("#") and f"seed {SEED}" in layer["name"], story  # "#1 · seed S · prompt"
    assert layer["same_parent"] and layer["index"] == layer["source_index"] + 1, f"not directly above Source\n{story}"
    assert value["alpha"]["outside_max"] == 0 and value["alpha"]["inner_min"] > 0, story
    assert value["source_unchanged"], f"the Source layer changed\n{story}"
    ui = value["ui"]
    print(f"vendored zip, menu action: layer after {value['time_to_layer_s']} s, UI max gap {ui['max_gap_ms']} ms")


def test_upscale_by_clicking_in_real_krita(tmp_path: Path, backend_endpoint: str) -> None:
    """The docker's Upscale mode (one Krita start): a 512x384 document upscaled 2x into a new 1024x768 document,
    the source untouched; then "Scale this document": 1024x768, the result a new layer above the scaled Source."""
    require_krita()
    zip_path = build_plugin.build(tmp_path / "krita_sdxl_refiner.zip", vendor=False)
    params = {"width": 512, "height": 384, "timeout_s": 150}
    run, value = run_scenario("scenario_upscale", zip_path, backend_endpoint, tmp_path / "krita", "e2e-upscale",
                              params, timeout_s=420)  # fmt: skip
    story = run.describe() + f"\nscenario value: {value}"
    assert run.result is not None and run.result["uncaught"] == [] and value["internal_errors"] == [], story
    assert value["button"] == "Run", story  # the mode box says Upscale
    new = value["new"]
    assert new["size"] == [1024, 768] and new["opaque"], story
    assert [bounds for _name, bounds in new["layers"]] == [[1024, 768]], story
    assert new["source_size"] == [512, 384] and new["source_layers_same"] and new["source_unchanged"], story
    scaled = value["scale"]
    assert scaled["size"] == [1024, 768] and scaled["source_bounds"] == [1024, 768], story
    assert scaled["layer_bounds"] == [0, 0, 1024, 768] and scaled["directly_above"], story
    assert " · Upscale" in scaled["layer"], story
    print(f"upscale in Krita: new document after {new['seconds']} s, scaled document after {scaled['seconds']} s")
