"""The refine engine on the tiny demo refiner, loaded from disk like the real one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import make_image, make_request

from krita_sdxl.backend.engine import pixels
from krita_sdxl.backend.engine.request import JobCancelled, RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.backend.models.refiner import load_refiner
from krita_sdxl.protocol import Image, ImageSpec


@pytest.fixture(scope="module")
def engine(demo_models: Any) -> Engine:
    return Engine.load(demo=True, device="cpu", cache_dir=demo_models.refiner.parent.parent)


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.calls: list[tuple[int, int, Image | None]] = []
        self.stop_after = stop_after

    def progress(self, step: int, total: int, preview: Image | None) -> None:
        self.calls.append((step, total, preview))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.calls) >= self.stop_after


def run(engine: Engine, req: RefineRequest, rec: Recorder | None = None) -> bytes:
    rec = rec or Recorder()
    out = engine.refine(req, rec.progress, rec.should_stop)
    assert out.spec == req.image.spec
    return bytes(out.data)


def channel(data: bytes, spec: ImageSpec, name: str) -> np.ndarray:
    values = np.frombuffer(data, pixels.numpy_dtype(spec)).reshape(spec.height, spec.width, spec.channels)
    return values[..., spec.order.index(name)]


def test_same_seed_same_bytes_other_seed_or_prompt_differs(engine: Engine) -> None:
    image = make_image(128, 128)
    first = run(engine, make_request(image, seed=7))
    assert run(engine, make_request(image, seed=7)) == first
    assert run(engine, make_request(image, seed=8)) != first
    assert run(engine, make_request(image, seed=7, prompt="a red dog in a forest at night")) != first


@pytest.mark.parametrize(
    ("order", "depth", "sample"),
    [("RGBA", 8, "uint"), ("BGRA", 16, "uint"), ("RGBA", 32, "float"), ("BGRA", 16, "float"), ("RGB", 8, "uint")],
)
def test_any_size_and_format_comes_back_the_same_with_alpha_untouched(
    engine: Engine, order: str, depth: int, sample: str
) -> None:
    image = make_image(333, 177, order, depth, sample)
    out = run(engine, make_request(image))
    assert len(out) == image.spec.byte_length
    if "A" in order:
        assert channel(out, image.spec, "A").tobytes() == channel(bytes(image.data), image.spec, "A").tobytes()
    before = channel(bytes(image.data), image.spec, "G").astype(np.float64)
    after = channel(out, image.spec, "G").astype(np.float64)
    top = 2**depth - 1 if sample == "uint" else 1.0
    assert np.abs(after - before).mean() / top > 0.01  # the model changed the picture
    assert np.all(np.isfinite(after))


def test_progress_once_per_denoising_step_with_previews(engine: Engine) -> None:
    req = make_request(make_image(333, 177), steps=20, strength=0.25, preview=True)
    rec = Recorder()
    run(engine, req, rec)
    total = req.plan.denoise_steps
    assert total == 5
    assert [(s, t) for s, t, _ in rec.calls] == [(i, total) for i in range(1, total + 1)]
    for _, _, preview in rec.calls:
        assert preview is not None
        assert preview.spec == ImageSpec(math.ceil(333 / 8), math.ceil(177 / 8), "RGBA", 8, "uint")
        assert len(set(bytes(preview.data)[3::4])) == 1  # opaque


def test_no_previews_unless_asked_and_an_adjusted_plan_runs_one_step(engine: Engine) -> None:
    req = make_request(make_image(64, 64), steps=3, strength=0.1)
    assert req.plan.adjusted and req.plan.denoise_steps == 1
    rec = Recorder()
    run(engine, req, rec)
    assert [(s, t, p) for s, t, p in rec.calls] == [(1, 1, None)]


def test_cancel_stops_within_one_step(engine: Engine) -> None:
    unet_calls = []
    hook = engine.pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    try:
        rec = Recorder(stop_after=2)
        with pytest.raises(JobCancelled):
            run(engine, make_request(make_image(64, 64), steps=50, strength=0.5), rec)
        assert len(rec.calls) == 2
        assert len(unet_calls) == 2  # one UNet call per step (the CFG pair is one batch)
        unet_calls.clear()
        with pytest.raises(JobCancelled):
            run(engine, make_request(make_image(64, 64)), Recorder(stop_after=0))
        assert unet_calls == []
    finally:
        hook.remove()


def test_mask_makes_outside_transparent_and_keeps_inside(engine: Engine) -> None:
    image = make_image(96, 80)
    mask = np.zeros((80, 96), np.uint8)
    mask[20:70, 10:80] = 255
    mask_img = Image(ImageSpec(96, 80, "L"), mask.tobytes())
    out = run(engine, make_request(image, mask=mask_img, feather=8.0))
    alpha_in = channel(bytes(image.data), image.spec, "A")
    alpha_out = channel(out, image.spec, "A")
    assert np.all(alpha_out[mask == 0] == 0)
    deep = np.zeros_like(mask, dtype=bool)
    deep[28:62, 18:72] = True  # 8 px or more inside the edge
    assert np.array_equal(alpha_out[deep], alpha_in[deep])
    ring = (mask > 0) & ~deep
    assert np.all(alpha_out[ring] <= alpha_in[ring])
    assert np.any((alpha_out[ring] > 0) & (alpha_out[ring] < alpha_in[ring]))  # a soft edge


def test_work_size_runs_smaller_and_returns_the_original_size(engine: Engine) -> None:
    image = make_image(200, 120, "BGRA", 16, "uint")
    rec = Recorder()
    out = run(engine, make_request(image, work_size=(96, 64), preview=True), rec)
    assert len(out) == image.spec.byte_length
    assert channel(out, image.spec, "A").tobytes() == channel(bytes(image.data), image.spec, "A").tobytes()
    preview = rec.calls[-1][2]
    assert preview is not None and (preview.spec.width, preview.spec.height) == (12, 8)
    assert out != run(engine, make_request(image))


def test_describe_on_cpu(engine: Engine, demo_refiner_path: Path) -> None:
    info = engine.describe()
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32" and info["vae_dtype"] == "float32"
    assert info["gpu"] is None and info["gpu_memory_total"] is None
    assert info["modes"] == ["refine", "generate", "two_stage"]  # the demo has a base model
    assert info["models"][0]["role"] == "refiner"
    assert Path(info["models"][0]["path"]) == demo_refiner_path
    assert info["torch"] and info["diffusers"]


def test_a_vae_that_overflows_in_fp16_is_rerun_in_fp32(demo_refiner_path: Path, caplog: Any) -> None:
    pipe = load_refiner(demo_refiner_path, "cpu", torch.float32, torch.float16)
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(3e4)  # overflows float16 (max 65504), not float32
    half_vae = Engine(pipe, "cpu", torch.float32, torch.float16)
    image = make_image(64, 48)
    with caplog.at_level("WARNING"):
        out = run(half_vae, make_request(image))
    assert "VAE decode in torch.float16 produced non-finite values" in caplog.text
    assert pipe.vae.dtype == torch.float16  # put back after the float32 retry
    assert channel(out, image.spec, "A").tobytes() == channel(bytes(image.data), image.spec, "A").tobytes()
