"""The commands that load a model in the process: ``refine --local`` and ``demo``."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from cli_helpers import assert_refused, krita_sdxl, rgba_picture
from PIL import Image as PILImage

from krita_sdxl.backend.cli.launcher import start_service

LONG_PROMPT = " ".join(["a red hill"] * 100)  # far beyond CLIP's 77 tokens


def test_refine_local_writes_same_size_png_with_alpha_quietly(demo_models, tmp_path):
    picture, out = rgba_picture(tmp_path / "in.png"), tmp_path / "out.png"
    proc = krita_sdxl("refine", str(picture), "--local", "--demo", "--prompt", LONG_PROMPT, "--steps", "5",
                      "--strength", "0.01", "--seed", "9", "-o", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "seed 9" in proc.stdout
    assert "strength 0.01 x 5 steps gives no denoising step: ran 1 of 100 steps" in proc.stderr
    for noise in ("Traceback", "WARNING", "Loading", "truncated", "torchvision", "[transformers]"):
        assert noise not in proc.stderr, proc.stderr
    debug = krita_sdxl("refine", str(picture), "--local", "--demo", "--prompt", LONG_PROMPT, "--steps", "2",
                       "--log-level", "debug", "-o", str(tmp_path / "debug.png"))  # fmt: skip
    assert debug.returncode == 0 and "truncated" in debug.stderr and "Loading" in debug.stderr
    with PILImage.open(out) as res, PILImage.open(picture) as src:
        assert res.size == (101, 67)
        assert res.getchannel("A").tobytes() == src.getchannel("A").tobytes()


@pytest.mark.slow
def test_local_generate_plans_with_the_models_own_scheduler_like_the_service(demo_models, tmp_path):
    """A refiner whose scheduler spaces its timesteps otherwise than SDXL 1.0 splits a generate job
    differently between base and refiner (here: base 1 step, refiner none; SDXL 1.0 spacing: the
    reverse); --local must plan it as the service does."""
    refiner = tmp_path / "refiner"
    shutil.copytree(demo_models.refiner, refiner)
    config = refiner / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), timestep_spacing="trailing")))
    models = ["--model", str(refiner), "--base-model", str(demo_models.base)]
    job = ["--mode", "generate", "--steps", "2", "--strength", "0.5", "--seed", "5", "--prompt", "a hill"]
    picture = rgba_picture(tmp_path / "in.png")
    svc = start_service([*models, "--endpoint", f"ipc://{tmp_path}/s.sock"])
    try:
        served = krita_sdxl("refine", str(picture), "--endpoint", svc.endpoint, *job, "-o", str(tmp_path / "a.png"))
    finally:
        svc.stop()
    local = krita_sdxl("refine", str(picture), "--local", *models, *job, "-o", str(tmp_path / "b.png"))
    assert served.returncode == 0 and local.returncode == 0, served.stderr + local.stderr
    a, b = (np.asarray(PILImage.open(tmp_path / n)).astype(int) for n in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 1, np.abs(a - b).max()


@pytest.mark.parametrize("device", ["cuda:99", *([] if torch.cuda.is_available() else ["cuda"])])
def test_an_unavailable_device_is_one_line(tmp_path, device):
    picture = rgba_picture(tmp_path / "in.png")
    proc = krita_sdxl("refine", str(picture), "--local", "--demo", "--device", device, "-o", str(tmp_path / "o.png"))
    assert_refused(proc, 2, f"device {device!r} is not available", "--device auto")


def test_a_checkpoint_that_is_not_sdxl_is_one_line(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(4, 4)}, str(ckpt))
    picture = rgba_picture(tmp_path / "in.png")
    proc = krita_sdxl("refine", str(picture), "--local", "--model", str(ckpt), "-o", str(tmp_path / "o.png"))
    assert_refused(proc, 2, "cannot load", str(ckpt))
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_demo_writes_only_the_files_it_names(demo_models, tmp_path):
    proc = krita_sdxl("demo", "-o", "out/r.png", "--steps", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"its model is built once into {os.environ['KRITA_SDXL_CACHE']}" in proc.stdout  # where the cache is
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["out", "out/r.png"]
    with PILImage.open(tmp_path / "out" / "r.png") as im:
        assert (im.size, im.mode) == ((512, 384), "RGBA")
    proc = krita_sdxl("demo", "-o", "r.png", "--save-input", "in.png", "--steps", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote in.png" in proc.stdout and (tmp_path / "in.png").is_file()
    assert_refused(krita_sdxl("demo", "-o", "noext", cwd=tmp_path), 2, "no file extension")
