"""Every scheduler a model folder may name counts its steps as it really runs them: for refine, generate and
two-stage, the total a job announces (``accepted.denoise_steps``, the ``progress`` total) equals the progress
events the engine sends and the UNet calls that run. Heun and KDPM2 call the UNet twice per step after the
first; PNDM adds warm-up steps.

The schedulers offered are the ones diffusers declares compatible with the SDXL scheduler
(``EulerDiscreteScheduler.compatibles``) that this environment can build, less EDMEuler (for EDM-trained
models, not SDXL's epsilon prediction)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from cli_helpers import krita_sdxl, rgba_picture

from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.protocol import CLIENT, Image, ImageSpec, decode, encode


def offered() -> list[str]:
    import diffusers

    from krita_sdxl.backend.models.demo import SCHEDULER_CONFIG

    euler = diffusers.EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    names = []
    for cls in euler.compatibles:
        try:
            cls.from_config(euler.config)
        except ImportError:  # needs a library the project does not install (scipy, torchsde)
            continue
        if cls.__name__ != "EDMEulerScheduler":
            names.append(cls.__name__)
    return sorted(names)


SCHEDULERS = offered()
JOBS = [  # (mode, steps, strength): the Heun cases, and a second-order split inside a step
    ("refine", 20, 0.5),
    ("generate", 20, 0.5),
    ("generate", 9, 1.0),
    ("two_stage", 10, 0.3),
]


def test_the_offered_schedulers_include_the_second_order_and_ancestral_ones() -> None:
    for name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                 "KDPM2DiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler", "UniPCMultistepScheduler",
                 "PNDMScheduler"):  # fmt: skip
        assert name in SCHEDULERS


@pytest.fixture(scope="module")
def engine(demo_models: Any) -> Engine:
    return Engine.load(demo=True, device="cpu", cache_dir=demo_models.refiner.parent.parent, speed="off")


@contextmanager
def scheduler(engine: Engine, name: str) -> Iterator[None]:
    """Both models run with ``name`` (built from their own configs, as a model folder naming it would)."""
    import diffusers

    cls = getattr(diffusers, name)
    pipes = [engine.models.get(role) for role in ("refiner", "base")]
    saved = [p.scheduler for p in pipes]
    for pipe in pipes:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    try:
        yield
    finally:
        for pipe, old in zip(pipes, saved, strict=True):
            pipe.scheduler = old


def picture(width: int = 64, height: int = 48) -> Image:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    data[..., 3] = 255
    return Image(ImageSpec(width, height, "RGBA", 8), data.tobytes())


def submitted(engine: Engine, mode: str, steps: int, strength: float, mask: Image | None = None) -> RefineRequest:
    """The job as the service plans it: a decoded submit, ``RefineRequest.from_message`` with the engine's schedule."""
    images = {"image": picture(), **({"mask": mask} if mask is not None else {})}
    msg = decode(CLIENT, encode(CLIENT, "submit", images=images, job="j", mode=mode, steps=steps,
                                strength=strength, seed=3, prompt="a cat"))  # fmt: skip
    return RefineRequest.from_message(msg, 3, engine.timesteps)


def counted(engine: Engine, req: RefineRequest) -> tuple[list[tuple[int, int]], int]:
    """(progress events, UNet calls of both models) of one job."""
    events: list[tuple[int, int]] = []
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    hooks = [engine.models.get(role).unet.register_forward_pre_hook(hook) for role in ("refiner", "base")]
    try:
        engine.refine(req, lambda step, total, _p: events.append((step, total)), lambda: False)
    finally:
        for h in hooks:
            h.remove()
    return events, calls[0]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_announced_total_equals_events_and_unet_calls(engine: Engine, name: str, caplog) -> None:
    caplog.set_level("WARNING", logger="krita_sdxl")
    with scheduler(engine, name):
        for mode, steps, strength in JOBS:
            req = submitted(engine, mode, steps, strength)
            announced = req.plan.denoise_steps
            events, calls = counted(engine, req)
            where = f"{name} {mode} {steps} x {strength}"
            assert events == [(i, announced) for i in range(1, announced + 1)], (where, announced, events)
            assert calls == announced, (where, announced, calls)
        mask = np.zeros((48, 64), np.uint8)
        mask[8:40, 16:48] = 255  # a masked refine holds the outside with this scheduler's own add_noise
        req = submitted(engine, "refine", 20, 0.5, Image(ImageSpec(64, 48, "L", 8), mask.tobytes()))
        events, calls = counted(engine, req)
        assert len(events) == calls == req.plan.denoise_steps, name
    assert "denoising steps, the step plan said" not in caplog.text


def test_heun_through_the_service_as_the_user_runs_it(demo_models, tmp_path) -> None:
    """A refiner folder whose scheduler is Heun: refine 20 x 0.5 announces and shows 19 of 19 calls."""
    refiner = tmp_path / "refiner"
    shutil.copytree(demo_models.refiner, refiner)
    for name, key in (("scheduler/scheduler_config.json", "_class_name"), ("model_index.json", "scheduler")):
        file = refiner / name
        value = "HeunDiscreteScheduler" if key == "_class_name" else ["diffusers", "HeunDiscreteScheduler"]
        file.write_text(json.dumps(dict(json.loads(file.read_text()), **{key: value})))
    svc = start_service(["--model", str(refiner), "--base-model", "none", "--endpoint", f"ipc://{tmp_path}/s.sock"])
    try:
        picture_file = rgba_picture(tmp_path / "in.png", 64, 48)
        proc = krita_sdxl("refine", str(picture_file), "--endpoint", svc.endpoint, "--steps", "20",
                          "--strength", "0.5", "-o", str(tmp_path / "o.png"))  # fmt: skip
    finally:
        svc.stop()
    assert proc.returncode == 0, proc.stderr
    counts = {tuple(map(int, m)) for m in re.findall(r"(\d+)/(\d+) \[", proc.stderr)}
    assert counts and all(total == 19 for _, total in counts) and (19, 19) in counts, proc.stderr
    assert "step plan said" not in svc.log, svc.log
