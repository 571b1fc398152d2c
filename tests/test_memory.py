"""Memory modes on a machine without a GPU, the auto choice, weight footprints, the out-of-memory
policy and the watermark switch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from krita_sdxl.backend.cli import main as cli
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.backend.engine.watermark import Watermark, available
from krita_sdxl.backend.models import oom
from krita_sdxl.backend.models.footprint import source_footprint
from krita_sdxl.backend.models.memory import (
    Footprint,
    MemoryModeError,
    Placement,
    choose_auto,
    lower_mode,
    module_bytes,
)
from krita_sdxl.backend.models.pipelines import load_pipeline
from krita_sdxl.backend.models.sources import resolve_source

GIB = 2**30


@pytest.mark.parametrize("mode", ["balanced", "model", "sequential"])
def test_offload_modes_on_the_cpu_give_a_clear_message(
    mode: str, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    code = cli.main(["serve", "--demo", "--device", "cpu", "--memory", mode, "--cache-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"memory mode '{mode}' needs a GPU (CUDA); this machine runs on cpu" in err
    assert "Traceback" not in err
    with pytest.raises(MemoryModeError, match="needs a GPU"):
        Placement(mode, "cpu")


def test_none_and_auto_run_on_the_cpu(demo_models: Any) -> None:
    engine = Engine.load(demo=True, device="cpu", memory="auto", cache_dir=demo_models.refiner.parent.parent)
    assert engine.describe()["memory"] == {"mode": "none", "requested": "auto", "reason": "no GPU offload on cpu"}
    with pytest.raises(MemoryModeError, match="must be one of"):
        Placement("lots", "cpu")


def test_auto_chooses_from_free_memory() -> None:
    refiner, base = Footprint(unet=5 * GIB, other=1 * GIB), Footprint(unet=5 * GIB, other=GIB // 4)
    both = [refiner, base]
    assert choose_auto("cuda", 80 * GIB, both)[0] == "none"
    assert choose_auto("cuda", 17 * GIB, both)[0] == "balanced"  # 10 GiB UNets + 1 GiB + 6 GiB margin
    assert choose_auto("cuda", 12 * GIB, both)[0] == "model"
    assert choose_auto("cuda", 8 * GIB, both)[0] == "sequential"
    _, reason = choose_auto("cuda", 12 * GIB, both)
    assert "12.0 GiB free" in reason
    assert choose_auto("cpu", None, both)[0] == "none"
    assert [lower_mode(m) for m in ("none", "balanced", "model", "sequential")] == [
        "balanced",
        "model",
        "sequential",
        None,
    ]


def test_footprints_from_file_headers_match_the_loaded_weights(demo_models: Any) -> None:
    source = resolve_source("refiner", demo=True)
    pipe = load_pipeline(source, torch.float32, torch.float32)
    footprint = source_footprint(source, 4)
    assert footprint.unet == module_bytes(pipe.unet)
    assert footprint.other == module_bytes(pipe.vae) + module_bytes(pipe.text_encoder_2) - sum(
        b.numel() * b.element_size() for m in (pipe.vae, pipe.text_encoder_2) for b in m.buffers()
    )
    base = source_footprint(resolve_source("base", demo=True), 2, shared=True)
    assert base.unet > 0 and 0 < base.other < footprint.other  # only the base's own text encoder


# --- the out-of-memory policy -------------------------------------------------------------------


def test_retry_runs_once_more_after_stepping_down() -> None:
    attempts: list[int] = []
    steps: list[str] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    def step_down() -> str:
        steps.append("balanced")
        return "balanced"

    assert oom.run_with_retry(flaky, True, step_down, lambda e: "advice") == "done"
    assert (len(attempts), steps) == (2, ["balanced"])
    attempts.clear()
    with pytest.raises(oom.OutOfMemoryError, match="advice"):
        oom.run_with_retry(flaky, False, step_down, lambda e: "advice")
    assert len(attempts) == 1
    with pytest.raises(ValueError):  # anything else passes through untouched
        oom.run_with_retry(lambda: int("x"), True, step_down, lambda e: "advice")


def test_advice_names_what_to_change() -> None:
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    text = oom.advice(exc, "none", "balanced")
    assert "Tried to allocate 2.00 GiB" in text and "more detail" not in text
    assert "smaller selection" in text and "--memory balanced" in text and "--oom-retry" in text
    assert "--memory" not in oom.advice(exc, "sequential", None)
    assert oom.is_out_of_memory(exc) and oom.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not oom.is_out_of_memory(RuntimeError("shapes do not match"))


# --- the watermark --------------------------------------------------------------------------------


def test_watermark_switch_and_status(demo_models: Any) -> None:
    off = Watermark(enabled=False)
    assert off.status == "disabled" and not off.active
    rgb = np.random.default_rng(0).random((64, 300, 3), dtype=np.float32)
    assert off.apply(rgb) is rgb
    on = Watermark(enabled=True)
    assert on.status == ("active" if available() else "unavailable")
    cache = demo_models.refiner.parent.parent
    engine = Engine.load(demo=True, device="cpu", cache_dir=cache, watermark=False, speed="off")
    assert engine.describe()["watermark"] == "disabled"
    engine = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="off")
    assert engine.describe()["watermark"] == on.status


def test_the_watermark_marks_wide_images_like_diffusers(demo_models: Any) -> None:
    pytest.importorskip("imwatermark", reason="invisible-watermark is an optional extra")
    from imwatermark import WatermarkDecoder

    mark = Watermark(enabled=True)
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:256, 0:320].astype(np.float32)
    rgb = np.stack([x / 320, y / 256, 0.5 + 0.25 * np.sin(x / 9) * np.cos(y / 7)], axis=-1) * 0.6 + 0.2
    marked = mark.apply(rgb)
    assert marked.shape == rgb.shape and 0 < np.abs(marked - rgb).mean() < 0.01  # invisible
    bgr = np.ascontiguousarray(marked[..., ::-1] * 255)  # (dwtDct is fragile: 8-bit rounding costs bits)
    bits = WatermarkDecoder("bits", 48).decode(bgr, "dwtDct")
    from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS

    assert sum(int(a == b) for a, b in zip(bits, WATERMARK_BITS, strict=True)) >= 44
    for h, w in ((64, 200), (64, 400)):  # under 256 px on a side: left alone (diffusers fails on 64x400)
        small = rng.random((h, w, 3), dtype=np.float32)
        assert np.array_equal(mark.apply(small), small)
    cache = demo_models.refiner.parent.parent
    marked_engine = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="off")
    plain_engine = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="off", watermark=False)
    assert marked_engine.describe()["watermark"] == "active"
    from krita_sdxl.backend.engine.request import RefineRequest
    from krita_sdxl.protocol import Image, ImageSpec, plan_img2img

    data = (np.clip(rgb[:, :264], 0, 1) * 255).astype(np.uint8)
    image = Image(ImageSpec(264, 256, "RGB", 8), data.tobytes())
    req = RefineRequest(image, "x", "", 0.3, plan_img2img(4, 0.5), 1, 5.0, 6.0, 2.5)
    outputs = [bytes(e.refine(req, lambda *a: None, lambda: False).data) for e in (marked_engine, plain_engine)]
    assert outputs[0] != outputs[1]
