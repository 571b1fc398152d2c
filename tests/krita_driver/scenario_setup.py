"""E2E inside real Krita: the docker's Set up… as a person meets it, with the plugin zip installed.

The docker's button reads "Set up…" (no backend yet); it opens the connection dialog; the folder is
typed; Check looks at this computer from inside Krita (the Pythons and nvidia-smi run with QProcess,
the decisions come from the zip's ``_vendor/common/krita_sdxl/backend/setup_plan``) and shows the
plan, writing nothing; Set up starts making the venv; Cancel stops it and removes the half-made venv.

params: folder, timeout_s
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenario_tools import click, find_docker, type_into, until


def run(ctx: Any) -> Any:
    docker = find_docker(ctx.app)
    docker.show()
    docker.raise_()
    panel = docker.widget()
    runner = panel.controller.setup
    folder = Path(ctx.params["folder"])
    timeout = float(ctx.params.get("timeout_s", 60))
    out: dict[str, Any] = {"button": panel.backend_button.text()}

    click(panel.backend_button)
    yield 300
    dialog = panel.dialog
    view = dialog.setup
    out["dialog_visible"] = dialog.isVisible() and view.isVisible()
    type_into(view.folder, str(folder))  # no Enter: in the dialog, Enter is OK
    out["repair_before"] = view.repair_button.isEnabled()
    click(view.check_button)
    yield from until(ctx, lambda: runner.phase != "checking", timeout, "Check")
    out["phase"] = runner.phase
    out["problem"] = f"{runner.problem.why} {runner.problem.what}" if runner.problem else None
    out["plan"] = runner.plan.describe() if runner.plan else None
    out["python"] = runner.plan.base.executable if runner.plan else None
    out["folder_after_check"] = folder.exists()
    out["run_button"] = view.run_button.text()
    yield 200
    plan = view.plan  # every line of the plan, its totals included, without scrolling inside it
    out["plan_box"] = {
        "scroll_max": plan.verticalScrollBar().maximum(),
        "height": plan.height(),
        "document_height": plan.document().size().height(),
        "last_line": plan.toPlainText().splitlines()[-1] if plan.toPlainText() else "",
        "empty_rows_shown": [
            w.objectName() or type(w).__name__ for w in (view.steps, view.message, view.detail) if w.isVisible()
        ],
    }
    path = ctx.artifact_path("dialog")
    if path is not None and dialog.grab().save(str(path), "PNG"):
        ctx.files.append(str(path))

    venv = folder / "venv"
    click(view.run_button)
    yield from until(ctx, lambda: (venv / "pyvenv.cfg").exists() or runner.phase in ("failed", "done"), timeout,
                     "the venv to appear")  # fmt: skip
    out["status_before_cancel"] = dict(runner.status)
    click(view.cancel_button)
    yield from until(ctx, lambda: runner.phase in ("cancelled", "failed", "done"), timeout, "Cancel")
    out["phase_after_cancel"] = runner.phase
    out["venv_after_cancel"] = venv.exists()
    out["message"] = runner.message
    state = folder / "setup-state.json"
    out["state"] = json.loads(state.read_text()).get("steps") if state.exists() else None
    out["log_has_venv_command"] = "-m venv" in runner.log_text()

    import krita_sdxl.backend.setup.plan as setup_plan

    out["setup_plan_file"] = setup_plan.__file__
    out["wheel"] = runner.plan.step("backend").commands[0][-2] if runner.plan else None
    dialog.close()
    return out
