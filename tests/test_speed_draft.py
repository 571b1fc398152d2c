"""The ``draft`` level's step cache on the demo model (real pipelines, compilation off so it stays fast),
and the ``fp8`` level's choice of layers and its step down when float8 cannot be applied."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from builders import make_image, make_request

from krita_sdxl.backend.engine import pixels
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.backend.speed import setup as speed_setup
from krita_sdxl.backend.speed import speed_path as speed
from krita_sdxl.backend.speed.fp8 import fp8_layers, is_fp8_linear, quantize_unet
from krita_sdxl.backend.speed.step_cache import StepCache

NOOP = (lambda *a: None, lambda: False)
NO_COMPILE = '"unet_mode": null, "vae_mode": null'


def load(demo_models: Any, monkeypatch: pytest.MonkeyPatch, setting: str, extra: str = "") -> Engine:
    monkeypatch.setenv(speed.OPTIONS_ENV, "{" + NO_COMPILE + extra + "}")
    return Engine.load(demo=True, device="cpu", cache_dir=demo_models.refiner.parent.parent, speed=setting)


class Counter:
    """Counts forward calls of a module (a forward hook: runs whatever wraps the forward)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        module.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))


def test_draft_with_interval_one_is_the_plain_picture(demo_models: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step full: the wrapped blocks change nothing (same padding as the compile level)."""
    req = make_request(make_image(200, 136), steps=20, strength=0.6)
    plain = pixels.samples(load(demo_models, monkeypatch, "on").refine(req, *NOOP))
    engine = load(demo_models, monkeypatch, "draft", ', "draft_interval": 1')
    assert engine.speed is not None and engine.speed.level == "draft"
    out = pixels.samples(engine.refine(req, *NOOP))
    np.testing.assert_array_equal(out, plain)
    assert engine.speed.stats()["step_cache"]["unet"]["cached"] == 0


def test_draft_reuses_the_deep_features_between_full_steps(demo_models: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """12 steps, interval 3: 4 full UNet calls and 8 that run only the shallow blocks; each job (and each new
    size) starts with a full step; the picture differs from the full-step one, and stays finite."""
    req = make_request(make_image(200, 136), steps=20, strength=0.6)
    full = pixels.samples(load(demo_models, monkeypatch, "on").refine(req, *NOOP)).astype(int)
    engine = load(demo_models, monkeypatch, "draft")
    unet = engine.pipe.unet
    deep, shallow = Counter(unet.mid_block.resnets[0]), Counter(unet.up_blocks[-1].resnets[0])
    out = pixels.samples(engine.refine(req, *NOOP)).astype(int)
    cache = engine.speed.stats()["step_cache"]["unet"]
    assert (cache["full"], cache["cached"]) == (4, 8)
    assert (deep.n, shallow.n) == (4, 12)
    assert np.abs(out - full).max() > 0
    assert out.shape == full.shape
    engine.refine(req, *NOOP)
    engine.refine(make_request(make_image(120, 64), steps=20, strength=0.6), *NOOP)
    cache = engine.speed.stats()["step_cache"]["unet"]
    assert (cache["full"], cache["cached"]) == (12, 24)
    assert deep.n == 12


def test_a_new_loop_is_told_apart_without_reading_the_gpu() -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1, sample_size=8,
    )  # fmt: skip
    cache = StepCache(unet, interval=2)
    sample = torch.zeros(1, 4, 8, 8)

    def step(sample: torch.Tensor, t: Any) -> bool:
        reused = cache.decide(sample, t)
        if not reused:  # what a full UNet call does: every deep block's output cached
            cache._cache = {id(b): None for b in cache.deep}
        return reused

    steps = torch.tensor([999.0, 800.0, 600.0, 400.0])
    assert [step(sample, t) for t in steps[1:]] == [False, True, False]  # one loop: consecutive elements
    other = torch.tensor([999.0, 500.0])
    assert step(sample, other[0]) is False  # another tensor: a new loop
    assert step(sample, other[1]) is True
    assert step(torch.zeros(1, 4, 16, 8), steps[3]) is False  # another size: a new loop
    cache._last = None
    assert [step(sample, t) for t in (900, 700, 500, 950)] == [False, True, False, False]  # numbers
    with pytest.raises(ValueError, match="branch must be from 0 to 0"):
        StepCache(unet, branch=1)
    before = unet.forward
    installed = cache.install()
    assert unet.forward != before and unet._step_cache is installed
    installed.uninstall()
    assert "forward" not in unet.__dict__ and all("forward" not in b.__dict__ for b in cache.deep)


# --- fp8 ---------------------------------------------------------------------------------------------


def test_fp8_takes_the_attention_linears_only(demo_models: Any) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(demo_models.refiner / "unet")
    chosen = fp8_layers(unet)
    assert chosen and all(".transformer_blocks." in n or n.endswith((".proj_in", ".proj_out")) for n in chosen)
    assert any(n.endswith("attn1.to_q") for n in chosen) and any(n.endswith("ff.net.2") for n in chosen)
    linears = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    left_out = set(linears) - set(chosen)
    assert any(n.startswith("time_embedding") for n in left_out)
    assert any(n.startswith("add_embedding") for n in left_out)
    assert not is_fp8_linear(torch.nn.Linear(24, 32), "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2")
    assert not is_fp8_linear(torch.nn.Conv2d(16, 16, 1), "down_blocks.1.attentions.0.proj_in")

    def broken(module: torch.nn.Module, granularity: str) -> None:
        raise AssertionError("Float8 dynamic quantization requires CUDA compute capability >= 8.9")

    assert quantize_unet(unet, quantize=broken) == (
        0,
        "torchao float8 failed: AssertionError: Float8 dynamic quantization requires CUDA compute capability >= 8.9",
    )
    calls: list[str] = []
    assert quantize_unet(unet, "row", quantize=lambda m, g: calls.append(g)) == (len(chosen), None)
    assert calls == ["row"]
    with pytest.raises(ValueError, match="granularity"):
        quantize_unet(unet, "block")


def test_fp8_that_cannot_quantise_runs_as_compile(demo_models: Any, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """The level chosen (as on a Hopper GPU), but float8 fails on this CPU (torchao refuses, or is not
    installed): one log line, the level runs as compile, the UNet keeps its own weights."""
    from krita_sdxl.backend.speed.levels import Plan

    monkeypatch.setattr(speed_setup, "choose", lambda s, c: Plan("fp8", "fp8", compile=True, unet="fp8"))
    monkeypatch.setenv(speed.OPTIONS_ENV, '{"backend": "eager", "vae_mode": null}')
    with caplog.at_level(logging.WARNING, logger="krita_sdxl.backend.speed.speed_path"):
        engine = Engine.load(demo=True, device="cpu", cache_dir=demo_models.refiner.parent.parent, speed="fp8")
    assert engine.speed is not None and engine.speed.level == "compile"
    lines = [r.getMessage() for r in caplog.records if "runs as" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("speed fp8 runs as compile: torchao")
    assert all(type(p) is torch.nn.Parameter for p in engine.pipe.unet.parameters())
    out = engine.refine(make_request(make_image(64, 64)), *NOOP)
    assert (out.spec.width, out.spec.height) == (64, 64)


def test_draft_without_compilation_has_nothing_to_warm_up(demo_models: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch.compile cannot run (no Triton on a GPU), draft is the step cache alone: no warm-up job;
    with compilation the warm-up job runs."""
    from krita_sdxl.backend.speed.levels import Plan

    cache = demo_models.refiner.parent.parent
    monkeypatch.setattr(speed_setup, "choose", lambda s, c: Plan("draft", "draft", step_cache=True, reasons=("no",)))
    engine = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="draft")
    assert engine.speed is not None and engine.speed.compiled_counts() == {}
    assert engine.speed.stats()["step_cache"]["unet"]["full"] == 0
    assert engine.warm_up(64) is None
    monkeypatch.setattr(speed_setup, "choose", lambda s, c: Plan("draft", "draft", compile=True, step_cache=True))
    monkeypatch.setenv(speed.OPTIONS_ENV, '{"backend": "eager", "vae_mode": null}')
    compiled = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="draft")
    assert compiled.speed is not None and compiled.speed.compiled_counts()["unet"] > 0
    assert compiled.warm_up(64) is not None
