"""The docker's Set up… in real Krita 5 under Xvfb, from the plugin zip (``krita_driver/scenario_setup.py``):
the button, the dialog, Check from inside Krita (Python found, plan shown, nothing written), Set up
started and cancelled (the half-made venv removed). The whole flow through to a refine runs offscreen
in test_setup_e2e.py; here what only Krita can show: its environment, its Python, the zip's layout."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import krita_harness
import pytest

from krita_sdxl.backend.setup.plan import VERSION, steps

pytestmark = [pytest.mark.krita, pytest.mark.slow]


def fresh_path() -> str:
    """PATH without a krita-sdxl command (an activated dev venv has one): the docker offers Set up…."""
    entries = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(p for p in entries if p and not (Path(p) / "krita-sdxl").exists())


def test_set_up_in_real_krita_checks_then_cancels_cleanly(tmp_path: Path) -> None:
    krita_harness.require_krita()
    build_plugin = krita_harness.load_build_plugin()
    zip_path = build_plugin.build(tmp_path / "dist" / "krita_sdxl_refiner.zip", vendor=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    folder = tmp_path / "backend"
    run = krita_harness.run_krita(
        "scenario_setup",
        tmp_path / "krita",
        name="e2e-setup",
        params={"folder": str(folder), "timeout_s": 60},
        plugin_zips=[zip_path],
        settings={"krita_sdxl": {"endpoint": endpoint}},
        timeout_s=180,
        extra_env={"KRITA_SDXL_TORCH_INDEX": "pip", "HF_HOME": str(tmp_path / "hf"), "PATH": fresh_path()},
    )
    value = run.check()
    story = run.describe() + f"\nscenario value: {value}"
    assert run.result is not None and run.result["uncaught"] == [], story
    assert value["button"] == "Set up…" and value["dialog_visible"], story
    assert value["phase"] == "ready" and value["problem"] is None, story
    assert "torch==2.13.0" in value["plan"] and "Download the SDXL 1.0 refiner" in value["plan"], story
    assert not value["folder_after_check"] and value["run_button"] == "Set up", story
    assert not value["repair_before"], story  # nothing set up: nothing to repair
    box = value["plan_box"]  # the totals are shown, nothing scrolls inside the plan, no empty rows below it
    assert box["scroll_max"] == 0 and box["height"] >= box["document_height"], story
    assert box["last_line"].startswith("Disk space it needs") and box["empty_rows_shown"] == [], story
    assert "/_vendor/common/krita_sdxl/backend/setup/plan/" in value["setup_plan_file"], story
    assert value["wheel"].endswith(f"/krita_sdxl_refiner/{steps.WHEELS_DIR}/krita_sdxl-{VERSION}-py3-none-any.whl")
    assert value["status_before_cancel"]["venv"] == "running", story
    assert value["phase_after_cancel"] == "cancelled" and not value["venv_after_cancel"], story
    assert "was not finished" in value["message"] and value["log_has_venv_command"], story
    assert value["state"] == {}, story  # nothing recorded as done
    print(f"Set up in real Krita: Python {value['python']}; Krita run {run.duration_s:.0f} s")
