"""The Krita harness works: real Krita 5 runs under Xvfb, a scenario reads back pixels and a
selection, and a plugin zip from packaging/build_plugin.py installs, enables and loads.

The plugin here is a probe generated in tmp_path (the real vendor.py plus an __init__ that
activates it and registers one action), so these tests do not depend on the real plugin.
"""

from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path

import krita_harness
import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE_INIT = '''"""Harness probe standing in for the real plugin: loads its vendored packages, adds one action."""
from krita import Extension, Krita

from . import vendor

vendor.activate()

import msgpack  # noqa: E402
import zmq  # noqa: E402
from krita_sdxl import protocol  # noqa: E402


class Probe(Extension):
    def setup(self):
        pass

    def createActions(self, window):
        window.createAction("krita_sdxl_harness_probe", "Harness probe", "tools/scripts")


Krita.instance().addExtension(Probe(Krita.instance()))
'''

PROBE_DESKTOP = """[Desktop Entry]
Type=Service
ServiceTypes=Krita/PythonPlugin
X-KDE-Library=krita_sdxl_refiner
X-Python-2-Compatible=false
Name=SDXL Refiner (harness probe)
Comment=Stand-in for the real plugin in the harness tests
"""


build_plugin = krita_harness.load_build_plugin()
require_krita = krita_harness.require_krita


def probe_zip(tmp_path: Path, **build_args) -> Path:
    plugin_dir = tmp_path / "probe_src"
    package = plugin_dir / "krita_sdxl_refiner"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PROBE_INIT, encoding="utf-8")
    (package / "vendor.py").write_bytes((ROOT / "krita_plugin" / "krita_sdxl_refiner" / "vendor.py").read_bytes())
    (plugin_dir / "krita_sdxl_refiner.desktop").write_text(PROBE_DESKTOP, encoding="utf-8")
    return build_plugin.build(tmp_path / "probe.zip", plugin_dir=plugin_dir, **build_args)


def pattern_sha256(width: int, height: int) -> str:
    out = bytearray()
    for y in range(height):
        for x in range(width):
            out += bytes((x & 255, y & 255, (x ^ y) & 255, 255 - (x + y) % 256))
    return hashlib.sha256(out).hexdigest()


@pytest.mark.krita
def test_krita_reads_back_layer_pixels_and_selection(tmp_path: Path) -> None:
    require_krita()
    zip_path = probe_zip(tmp_path, vendor=False)
    run = krita_harness.run_krita(
        "scenario_smoke",
        tmp_path / "krita",
        name="harness-smoke",
        params={
            "width": 64,
            "height": 48,
            "rect": [10, 8, 30, 22],
            "setting": ["krita_sdxl_e2e", "probe"],
            "actions": ["krita_sdxl_harness_probe", "krita_sdxl_no_such_action"],
            "modules": ["krita_sdxl_refiner", "krita_sdxl.protocol", "zmq", "msgpack"],
        },
        plugin_zips=[zip_path],
        settings={"krita_sdxl_e2e": {"probe": "tcp://127.0.0.1:5555 héllo"}},
        timeout_s=90,
    )
    value = run.check()
    story = run.describe()

    assert value["version"].startswith("5."), story
    assert run.result is not None and run.result["python_version"].startswith("3."), story
    # createDocument adds a white "Background" paint layer; ours goes on top of it.
    names = [name for name, _type in value["nodes"]]
    assert names[:2] == ["Background", "Pattern"], story
    assert value["active"] == "Pattern", story
    assert value["roundtrip_equal"], story
    assert value["sha256"] == pattern_sha256(64, 48) == value["expected_sha256"], story
    assert value["sub_equal"], story
    # First pixel of the rectangle at (10, 8): B = x, G = y, R = x ^ y, A = 255 - (x + y).
    assert value["pixel_at_rect"] == [10, 8, 10 ^ 8, 255 - 18], story
    assert value["selection_bounds"] == [10, 8, 30, 22], story
    assert value["selection_values"] == [255] and value["selection_len"] == 30 * 22, story
    assert value["outside_max"] == 0, story
    assert value["setting"] == "tcp://127.0.0.1:5555 héllo", story
    assert value["actions"] == {"krita_sdxl_harness_probe": True, "krita_sdxl_no_such_action": False}, story

    pykrita = str(tmp_path / "krita" / "home" / ".local" / "share" / "krita" / "pykrita")
    modules = value["modules"]
    assert modules["krita_sdxl_refiner"].startswith(pykrita + "/krita_sdxl_refiner/"), story
    assert modules["krita_sdxl.protocol"].startswith(pykrita + "/krita_sdxl_refiner/_vendor/common/"), story
    # --no-vendor: Krita's Python must bring its own (Debian: python3-zmq, python3-msgpack).
    assert modules["zmq"] and "_vendor" not in modules["zmq"], story
    assert run.result["uncaught"] == [], story
    shots = [p.name for p in run.screenshots]
    assert "harness-smoke-screen.png" in shots and "harness-smoke-layer.png" in shots, story
    print(f"Krita smoke run: {run.duration_s:.1f} s (warm HOME: {run.warm})")


@pytest.mark.krita
@pytest.mark.slow
@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"), reason="vendors manylinux x86_64"
)
def test_vendored_zip_loads_its_own_pyzmq_inside_krita(tmp_path: Path) -> None:
    """The zip with wheels: Krita imports pyzmq/msgpack from _vendor/<tag>, not from the system.

    Downloads the manylinux wheels into build/wheels the first time (PyPI).
    """
    require_krita()
    zip_path = probe_zip(tmp_path, vendor=True, platforms=["*-manylinux_x86_64"])
    run = krita_harness.run_krita(
        "scenario_smoke",
        tmp_path / "krita",
        name="harness-vendored",
        params={"modules": ["zmq", "msgpack", "zmq.backend.cython._zmq"], "actions": ["krita_sdxl_harness_probe"]},
        plugin_zips=[zip_path],
        timeout_s=90,
    )
    value = run.check()
    story = run.describe()
    py = run.result["python_version"].split(".")
    tag = f"cp{py[0]}{py[1]}-manylinux_x86_64"
    vendor = f"/pykrita/krita_sdxl_refiner/_vendor/{tag}/"
    for module in ("zmq", "msgpack", "zmq.backend.cython._zmq"):
        assert vendor in (value["modules"][module] or ""), f"{module} not from {vendor}\n{story}"
    assert value["actions"] == {"krita_sdxl_harness_probe": True}, story


@pytest.mark.krita
@pytest.mark.slow
def test_a_failing_scenario_is_reported_and_krita_still_quits(tmp_path: Path) -> None:
    require_krita()
    run = krita_harness.run_krita("scenario_fail", tmp_path, name="harness-raise", params={"mode": "raise"})
    assert run.result is not None and not run.timed_out and not run.hung_on_quit, run.describe()
    assert run.result["ok"] is False and run.result["error"] == "RuntimeError: boom from the scenario"
    assert "scenario_fail.py" in run.result["traceback"]
    assert len(run.result["uncaught"]) == 1 and "ValueError: boom from a Qt slot" in run.result["uncaught"][0]
    assert run.returncode == 0
    with pytest.raises(AssertionError, match="boom from the scenario"):
        run.check()


@pytest.mark.krita
@pytest.mark.slow
def test_the_driver_watchdog_ends_a_scenario_that_never_finishes(tmp_path: Path) -> None:
    require_krita()
    run = krita_harness.run_krita(
        "scenario_fail", tmp_path, name="harness-hang", params={"mode": "hang"}, scenario_timeout_s=8
    )
    assert run.result is not None and not run.timed_out, run.describe()
    assert run.result["error"] == "TimeoutError: scenario still running after 8 s", run.describe()


@pytest.mark.krita
@pytest.mark.slow
def test_the_hard_timeout_kills_a_blocked_krita(tmp_path: Path) -> None:
    require_krita()
    run = krita_harness.run_krita(
        "scenario_fail", tmp_path, name="harness-block", params={"mode": "block"}, timeout_s=30, scenario_timeout_s=10
    )
    assert run.timed_out and run.result is None, run.describe()
    assert run.duration_s < 45
    assert run.screenshots and run.screenshots[0].is_file()
    assert "failing on purpose: block" in run.log  # the scenario's own log line reached Krita's stderr
    with pytest.raises(AssertionError, match="no result file"):
        run.check()


def test_update_kritarc_edits_groups_in_place(tmp_path: Path) -> None:
    rc = tmp_path / "kritarc"
    rc.write_text("topKey=1\n\n[python]\nenable_other=true\n\n[MainWindow][DockWidget X]\nvisible=true\n")
    krita_harness.update_kritarc(
        rc,
        {
            "python": {"enable_other": False, "enable_mine": True},
            "krita_sdxl": {"prompt": " two\nlines\\ ", "seed": 7},
        },
    )
    assert rc.read_text() == (
        "topKey=1\n\n[python]\nenable_other=false\nenable_mine=true\n\n[MainWindow][DockWidget X]\nvisible=true\n"
        "\n[krita_sdxl]\nprompt=\\stwo\\nlines\\\\\\s\nseed=7\n"
    )
