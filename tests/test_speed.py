"""The speed path's CPU-testable parts: the setting, padding to buckets, the prompt cache, the compile cache,
the fallback to eager, and the engine with the speed path on (compilation off, so it stays fast)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from krita_sdxl.backend.engine import pixels
from krita_sdxl.backend.speed import prompt_cache
from krita_sdxl.backend.speed import speed_path as speed
from krita_sdxl.backend.speed.speed_path import SpeedOptions, SpeedPath, pad_to_size, resolve_speed


@pytest.mark.parametrize(
    ("setting", "device", "on"),
    [("auto", "cuda", True), ("auto", "cuda:1", True), ("auto", "cpu", False), ("auto", "mps", False),
     ("on", "cpu", True), ("off", "cuda", False)],
)  # fmt: skip
def test_resolve_speed(setting: str, device: str, on: bool) -> None:
    assert resolve_speed(setting, device) is on


def test_resolve_speed_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="speed"):
        resolve_speed("fast", "cuda")


def test_pad_to_size_mirrors_and_crops_back() -> None:
    rgb = np.random.default_rng(0).random((100, 70, 3), dtype=np.float32)
    padded = pad_to_size(rgb, 256, 256)
    assert padded.shape == (256, 256, 3)
    np.testing.assert_array_equal(padded[:100, :70], rgb)
    np.testing.assert_array_equal(padded[100, :70], rgb[99])  # symmetric: the edge row repeats
    assert pad_to_size(rgb, 100, 70) is rgb
    with pytest.raises(ValueError):
        pad_to_size(rgb, 64, 64)


def test_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert SpeedOptions.from_env("cuda") == SpeedOptions()
    assert SpeedOptions().scope == "regional" and SpeedOptions().dynamic is True
    whole = '{"scope": "whole", "unet_mode": "reduce-overhead", "dynamic": false, "buckets": true}'
    monkeypatch.setenv(speed.OPTIONS_ENV, whole)
    assert SpeedOptions.from_env("cuda").unet_mode == "reduce-overhead"
    assert SpeedOptions.from_env("cpu").unet_mode == "default"  # no CUDA graphs off CUDA
    monkeypatch.setenv(speed.OPTIONS_ENV, '{"regions": ["ResnetBlock2D"]}')
    assert SpeedOptions.from_env("cuda").regions == ("ResnetBlock2D",)  # JSON lists become tuples
    monkeypatch.setenv(speed.OPTIONS_ENV, '{"unet_mode": "reduce-overhead"}')
    with pytest.raises(ValueError, match="scope"):  # CUDA graphs around single blocks: refused
        SpeedOptions.from_env("cuda")
    monkeypatch.setenv(speed.OPTIONS_ENV, '{"scope": "everything"}')
    with pytest.raises(ValueError, match="regional, whole"):
        SpeedOptions.from_env("cuda")
    monkeypatch.setenv(speed.OPTIONS_ENV, '{"unet_mode": null, "channels_last": true}')
    opts = SpeedOptions.from_env("cuda")
    assert opts.unet_mode is None and opts.channels_last
    monkeypatch.setenv(speed.OPTIONS_ENV, '{"no_such_option": 1}')
    with pytest.raises(ValueError, match=speed.OPTIONS_ENV):
        SpeedOptions.from_env("cuda")


def test_configure_compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    env = speed.configure_compile_cache(tmp_path / "cc")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "cc" / "inductor").resolve())
    assert env["TRITON_CACHE_DIR"].startswith(str(tmp_path.resolve()))
    assert inductor_config.fx_graph_cache is True
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == env["TORCHINDUCTOR_CACHE_DIR"]


class FakePipe:
    """Just enough of a pipeline for the prompt cache and the padding."""

    def __init__(self) -> None:
        self.calls = 0
        self.unet = torch.nn.Linear(2, 2)
        self.vae = None

    def encode_prompt(self, prompt: str, device: Any = None, negative_prompt: str | None = None,
                      prompt_embeds: torch.Tensor | None = None, lora_scale: float | None = None) -> Any:  # fmt: skip
        self.calls += 1
        return (torch.full((1,), float(self.calls)),)


def test_prompt_cache_reuses_embeddings_and_stays_bounded() -> None:
    pipe = FakePipe()
    cache = prompt_cache.install(pipe, size=2)
    assert prompt_cache.install(pipe, size=2) is cache  # once per pipeline
    a = pipe.encode_prompt("cat", device=torch.device("cpu"), negative_prompt="blur")
    assert pipe.encode_prompt(prompt="cat", device=torch.device("cpu"), negative_prompt="blur") is a
    assert pipe.calls == 1
    pipe.encode_prompt("dog")
    pipe.encode_prompt("cow")  # evicts "cat"
    pipe.encode_prompt("cat", device=torch.device("cpu"), negative_prompt="blur")
    assert pipe.calls == 4
    pipe.encode_prompt("cow", prompt_embeds=torch.zeros(1))  # tensors given: never cached
    pipe.encode_prompt("cow", lora_scale=0.5)
    assert pipe.calls == 6
    assert prompt_cache.entries(pipe) == 2
    assert prompt_cache.install(FakePipe(), size=0) is None  # off


class Boom(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def test_a_failing_compiled_call_falls_back_to_eager_for_good() -> None:
    module = Boom()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("compiler exploded")

    def fake_compile(**kwargs: Any) -> None:  # what nn.Module.compile does, with a compiler that fails
        module._compiled_call_impl = broken

    module.compile = fake_compile  # type: ignore[method-assign]
    path = SpeedPath(FakePipe(), "cpu", SpeedOptions(unet_mode=None, vae_mode=None))  # type: ignore[arg-type]
    path._compile("boom", module, "default", module)
    out = module(torch.zeros(2, 4, 8, 8))
    assert torch.equal(out, torch.ones(2, 4, 8, 8))
    assert path.fallback is not None and "compiler exploded" in path.fallback
    assert module._compiled_call_impl is None  # eager from now on
    assert path.describe()["enabled"] is False
    assert torch.equal(module(torch.zeros(1)), torch.ones(1))


def test_engine_with_the_speed_path_pads_to_buckets(demo_models: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Speed path on, compilation off (fast on the CPU): buckets, crop back, preview size, stats."""
    from test_engine import Recorder, make_image, make_request

    from krita_sdxl.backend.engine.sdxl_engine import Engine

    monkeypatch.setenv(speed.OPTIONS_ENV, '{"unet_mode": null, "vae_mode": null, "buckets": true}')
    cache = demo_models.refiner.parent.parent
    engine = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="on", compile_cache=cache / "cc")
    assert engine.speed is not None and engine.describe()["speed"]["enabled"]
    for w, h in [(100, 60), (200, 250), (300, 130)]:
        rec = Recorder()
        out = engine.refine(make_request(make_image(w, h), preview=True), rec.progress, rec.should_stop)
        assert (out.spec.width, out.spec.height) == (w, h)
        preview = rec.calls[-1][2]
        assert preview is not None and (preview.spec.width, preview.spec.height) == (-(-w // 8), -(-h // 8))
    stats = engine.speed.stats()
    assert stats["jobs"] == 3
    assert stats["buckets"] == [(256, 256), (384, 256)]
    assert stats["prompt_cache_entries"] == 1
    plain = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="off")
    assert plain.speed is None and plain.describe()["speed"] == {"enabled": False}


def _compile_backend() -> str:
    """aot_eager_decomp_partition: dynamo, AOT autograd and inductor's decompositions, no code
    generation, to stay quick; KRITA_SDXL_TEST_COMPILE=inductor compiles for real (minutes here)."""
    return "inductor" if os.environ.get("KRITA_SDXL_TEST_COMPILE") == "inductor" else "aot_eager_decomp_partition"


@pytest.mark.slow
def test_regional_compile_compiles_nothing_for_new_selection_sizes(
    demo_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default scope: the demo UNet's and VAE's blocks compiled one by one, sizes symbolic. The
    first job compiles a few graphs; jobs at other sizes, square or not, compile
    none, and the pictures match the eager path's. On the CPU, the convolution backend choice guards on
    size (mkldnn for inputs above 20480 elements per 16 channels), so the sizes here all stay above it."""
    from test_engine import make_image, make_request

    from krita_sdxl.backend.engine.sdxl_engine import Engine

    cache = demo_models.refiner.parent.parent
    monkeypatch.setenv(speed.OPTIONS_ENV, '{"unet_mode": null, "vae_mode": null}')  # same padding, eager
    plain = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="on")
    monkeypatch.setenv(speed.OPTIONS_ENV, f'{{"backend": "{_compile_backend()}"}}')
    engine = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="on", compile_cache=tmp_path / "cc")
    assert engine.speed is not None and engine.speed.options.scope == "regional"
    described = engine.describe()["speed"]
    assert described["scope"] == "regional"
    assert described["compiled"]["unet"] > 2 and described["compiled"]["vae_decoder"] > 2  # blocks, not modules
    noop = (lambda *a: None, lambda: False)
    # The first job compiles in another thread, as in the service's worker: torch's compiler settings
    # are per thread (torch 2.13), so the ones the speed path needs must be made there too.
    worker = threading.Thread(target=engine.refine, args=(make_request(make_image(300, 300)), *noop))
    worker.start()
    worker.join()
    first = engine.speed.stats()
    assert first["fallback"] is None
    assert 8 < first["compiled_graphs"] <= 30  # more than dynamo's default limit of 8 per code object
    for w, h in [(400, 300), (500, 450), (390, 600), (330, 330)]:
        req = make_request(make_image(w, h))
        fast = pixels.samples(engine.refine(req, *noop)).astype(int)
        slow = pixels.samples(plain.refine(req, *noop)).astype(int)
        assert fast.shape == slow.shape == (h, w, 4)
        assert np.abs(fast - slow).max() <= 2  # same picture (float rounding aside)
    last = engine.speed.stats()
    assert last["fallback"] is None
    assert last["compiled_graphs"] == first["compiled_graphs"]
    assert last["buckets"] == [(320, 320), (384, 384), (448, 320), (448, 640), (512, 512)]  # multiples of 64


def test_prepare_cudagraph_thread_sets_up_a_new_thread() -> None:
    """The service's worker thread is no thread inductor set up: reduce-overhead needs this there."""
    import threading

    from torch._inductor import cudagraph_trees as trees

    seen: dict[str, bool] = {}

    def body() -> None:
        seen["before"] = hasattr(trees.local, "tree_manager_containers")
        speed.prepare_cudagraph_thread()
        seen["local"] = hasattr(trees.local, "tree_manager_containers")
        seen["tls"] = torch._C._is_key_in_tls("tree_manager_containers")
        speed.prepare_cudagraph_thread()  # idempotent

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"before": False, "local": True, "tls": True}


@pytest.mark.slow
def test_whole_static_compile_is_one_compilation_per_bucket(
    demo_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole scope with static shapes: a new bucket compiles the three modules again, a size in a
    bucket already seen compiles nothing."""
    from test_engine import make_image, make_request

    from krita_sdxl.backend.engine.sdxl_engine import Engine

    options = {"scope": "whole", "dynamic": False, "buckets": True, "backend": _compile_backend()}
    monkeypatch.setenv(speed.OPTIONS_ENV, json.dumps(options))
    cache = demo_models.refiner.parent.parent
    engine = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="on", compile_cache=tmp_path / "cc")
    assert engine.speed is not None and engine.speed.options.dynamic is False
    assert engine.describe()["speed"]["compiled"] == {"unet": 1, "vae_decoder": 1, "vae_encoder": 1}
    noop = (lambda *a: None, lambda: False)
    engine.refine(make_request(make_image(300, 300)), *noop)  # bucket 384x384
    first = engine.speed.stats()["compiled_graphs"]
    engine.refine(make_request(make_image(380, 330)), *noop)  # same bucket
    assert engine.speed.stats()["compiled_graphs"] == first
    engine.refine(make_request(make_image(500, 300)), *noop)  # bucket 512x384
    stats = engine.speed.stats()
    assert stats["compiled_graphs"] == first + 3  # UNet, VAE encoder, VAE decoder
    assert stats["fallback"] is None and stats["buckets"] == [(384, 384), (512, 384)]


class ResnetBlock2D(torch.nn.Linear):
    """Named like diffusers' block, so the regional scope picks it."""


def _fake_pipe(vae: Any = None) -> Any:
    from types import SimpleNamespace

    def blocks() -> torch.nn.Module:
        return torch.nn.Sequential(ResnetBlock2D(2, 2), ResnetBlock2D(2, 2))

    vae = vae or SimpleNamespace(decoder=blocks(), encoder=blocks())
    return SimpleNamespace(unet=blocks(), vae=vae)


def test_a_second_pipeline_shares_the_vae_and_is_forgotten_on_unload() -> None:
    """The base (loaded later) gets its UNet's blocks compiled, not the VAE it shares with the refiner; on
    unload the speed path drops every reference to the base's blocks, so its memory can be freed."""
    refiner = _fake_pipe()
    path = SpeedPath(refiner, "cpu", SpeedOptions(backend="eager")).apply()
    assert path.compiled_counts() == {"unet": 2, "vae_decoder": 2, "vae_encoder": 2}
    base = _fake_pipe(vae=refiner.vae)
    path.add_pipe(base, "base")
    assert path.compiled_counts() == {"unet": 2, "vae_decoder": 2, "vae_encoder": 2, "base_unet": 2}
    assert all(m._compiled_call_impl is not None for m in base.unet)
    path.forget(base)
    assert path.compiled_counts() == {"unet": 2, "vae_decoder": 2, "vae_encoder": 2}  # the shared VAE stays
    assert not any(m is block for m in path._modules.values() for block in base.unet)
    x = torch.ones(1, 2)
    assert torch.equal(refiner.unet(x), refiner.unet._call_impl(x))  # the compiled blocks still run
