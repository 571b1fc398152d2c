"""The ``trt`` level's CPU-testable parts: the engine cache on disk (keys, invalidation, atomic writes,
corrupt files), the background builds and the switch from eager to the engine, with a fake builder and
an "engine" that is the export wrapper itself; the weights hash; the ONNX export (where onnx is here)."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from krita_sdxl.backend.speed.trt import unet as trt_unet
from krita_sdxl.backend.speed.trt.background import BackgroundEngines, TrtUnet, engine_inputs
from krita_sdxl.backend.speed.trt.cache import MAGIC, EngineCache, EngineKey

KEY = EngineKey(model="folder:/m:UNet2DConditionModel", weights="ab" * 32, width=1024, height=1024, batch=2,
                precision="fp16", tensorrt="11.4.0.106", gpu="NVIDIA H200", capability="9.0")  # fmt: skip


# --- the cache -----------------------------------------------------------------------------------


def test_cache_round_trip_and_every_key_field_invalidates(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    assert cache.load(KEY) is None
    payload = os.urandom(4096)
    path = cache.save(KEY, payload)
    assert path.parent == tmp_path / "engines" and "1024x1024-b2-fp16" in path.name
    assert cache.load(KEY) == payload
    changes = {"model": "folder:/other:UNet2DConditionModel", "weights": "cd" * 32, "width": 1152, "height": 896,
               "batch": 1, "precision": "bf16", "tensorrt": "11.5.0", "gpu": "NVIDIA H100 80GB HBM3",
               "capability": "8.9", "text_tokens": 154, "text_dim": 2048, "extra": "opt=5"}  # fmt: skip
    assert set(changes) == {f.name for f in dataclasses.fields(EngineKey)}
    for name, value in changes.items():
        other = dataclasses.replace(KEY, **{name: value})
        assert other.filename() != KEY.filename(), name
        assert cache.load(other) is None, name  # another key never reads this engine
    assert cache.load(KEY) == payload


@pytest.mark.parametrize(
    "damage",
    ["truncate", "flip_payload", "garbage", "empty", "other_key", "huge_header"],
)
def test_a_corrupt_engine_file_is_ignored_and_removed(tmp_path: Path, damage: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    cache = EngineCache(tmp_path)
    path = cache.save(KEY, b"engine-bytes" * 100)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-10])
    elif damage == "flip_payload":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other_key":  # a file renamed over another key's name
        cache.save(dataclasses.replace(KEY, width=512), b"x" * 10).replace(path)
    else:
        path.write_bytes(MAGIC + (2**31).to_bytes(4, "big") + b"{}")
    assert cache.load(KEY) is None
    assert not path.exists()  # removed: the next build writes a sound one
    assert "not usable" in caplog.text
    cache.save(KEY, b"fresh")
    assert cache.load(KEY) == b"fresh"


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that dies before the rename leaves neither a partial engine nor a temporary file; an
    engine already there stays readable."""
    cache = EngineCache(tmp_path)
    cache.save(KEY, b"old engine")

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        cache.save(KEY, b"new engine")
    monkeypatch.undo()
    assert cache.load(KEY) == b"old engine"
    assert [p.name for p in tmp_path.iterdir()] == [KEY.filename()]
    with pytest.raises(ValueError):
        cache.save(KEY, b"")


def test_prune_removes_other_runtimes_and_leftovers(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    keep = [cache.save(KEY, b"a"), cache.save(dataclasses.replace(KEY, width=512, weights="ff"), b"b")]
    gone = [cache.save(dataclasses.replace(KEY, tensorrt="10.16"), b"c"),
            cache.save(dataclasses.replace(KEY, gpu="NVIDIA L4", capability="8.9"), b"d")]  # fmt: skip
    junk = tmp_path / "broken.engine"
    junk.write_bytes(b"nothing")
    stale = tmp_path / f".{KEY.filename()}.x1y2.tmp"
    stale.write_bytes(b"half")
    removed = cache.prune(KEY)
    assert sorted(removed) == sorted([*gone, junk, stale])
    assert all(p.exists() for p in keep) and not any(p.exists() for p in removed)


# --- background builds ---------------------------------------------------------------------------


class FakeBuilder:
    def __init__(self, fail: bool = False) -> None:
        self.built: list[EngineKey] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = fail

    def __call__(self, key: EngineKey) -> bytes:
        self.gate.wait(10)
        self.built.append(key)
        if self.fail:
            raise RuntimeError("builder out of memory")
        return f"engine {key.width}x{key.height} b{key.batch}".encode()


def fake_key(width: int, height: int, batch: int, weights: str = "w1") -> EngineKey:
    return dataclasses.replace(KEY, width=width, height=height, batch=batch, weights=weights)


def make_engines(folder: Path, builder: FakeBuilder, weights: str = "w1") -> BackgroundEngines:
    def load(payload: bytes) -> Any:
        return lambda *args: payload  # a "runner" that says which engine it is

    return BackgroundEngines(EngineCache(folder), lambda w, h, b: fake_key(w, h, b, weights), builder, load)


def test_an_engine_is_built_once_in_the_background_then_served(tmp_path: Path) -> None:
    builder = FakeBuilder()
    builder.gate.clear()  # the build waits until the test lets it go
    engines = make_engines(tmp_path, builder)
    assert engines.get(1024, 1024, 2) is None  # not ready: the call runs eager
    assert engines.get(1024, 1024, 2) is None and engines.status() == {"1024x1024 b2": "pending"}
    builder.gate.set()
    runner = engines.wait(1024, 1024, 2, timeout=10)
    assert runner is not None and runner() == b"engine 1024x1024 b2"
    assert engines.get(1024, 1024, 2) is runner
    assert engines.status() == {"1024x1024 b2": "ready"}
    assert len(builder.built) == 1 and "build_s" in engines.timings[(1024, 1024, 2)]
    engines.close()


def test_a_restart_loads_the_cached_engine_without_building(tmp_path: Path) -> None:
    first = FakeBuilder()
    make_engines(tmp_path, first).wait(1024, 768, 2, timeout=10)
    again = FakeBuilder()
    engines = make_engines(tmp_path, again)
    runner = engines.wait(1024, 768, 2, timeout=10)
    assert runner is not None and runner() == b"engine 1024x768 b2"
    assert again.built == [] and "build_s" not in engines.timings[(1024, 768, 2)]
    changed = FakeBuilder()  # new weights (a fine-tune saved over the model): another key, built again
    assert make_engines(tmp_path, changed, weights="w2").wait(1024, 768, 2, timeout=10) is not None
    assert [k.weights for k in changed.built] == ["w2"]


def test_a_corrupt_cached_engine_is_rebuilt(tmp_path: Path) -> None:
    make_engines(tmp_path, FakeBuilder()).wait(512, 512, 2, timeout=10)
    path = EngineCache(tmp_path).path(fake_key(512, 512, 2))
    path.write_bytes(path.read_bytes()[:-3])
    builder = FakeBuilder()
    assert make_engines(tmp_path, builder).wait(512, 512, 2, timeout=10) is not None
    assert len(builder.built) == 1


def test_a_failed_build_leaves_that_bucket_eager_and_is_not_retried(tmp_path: Path) -> None:
    builder = FakeBuilder(fail=True)
    engines = make_engines(tmp_path, builder)
    assert engines.wait(640, 640, 2, timeout=10) is None
    assert engines.status()["640x640 b2"].startswith("failed: RuntimeError: builder out of memory")
    assert engines.get(640, 640, 2) is None
    builder.fail = False
    assert engines.wait(768, 768, 2, timeout=10) is not None  # other buckets still build
    assert len(builder.built) == 2 and list(EngineCache(tmp_path).folder.glob("*640x640*")) == []


# --- the UNet hook and the engine ----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_pipe(demo_models: Any) -> Any:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline.from_pretrained(demo_models.refiner)


def unet_call(pipe: Any, batch: int = 2, rows: int = 8, cols: int = 16) -> tuple[tuple[Any, ...], dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    args = (torch.randn(batch, 4, rows, cols, generator=g), torch.tensor(500.0))
    kwargs = {
        "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=g),
                              "time_ids": torch.tensor([[128.0, 64.0, 0.0, 0.0, 6.0]] * batch)},
        "return_dict": False,
    }  # fmt: skip
    return args, kwargs


def test_engine_inputs_take_only_calls_an_engine_can_run(demo_pipe: Any) -> None:
    args, kwargs = unet_call(demo_pipe)
    got = engine_inputs(args, kwargs, 77)
    assert got is not None and got["sample"] is args[0] and got["return_dict"] is False
    assert engine_inputs(args, {**kwargs, "cross_attention_kwargs": {"scale": 0.5}}, 77) is None
    assert engine_inputs(args, {**kwargs, "timestep_cond": torch.zeros(1)}, 77) is None
    assert engine_inputs(args, {**kwargs, "encoder_hidden_states": torch.zeros(2, 154, 32)}, 77) is None
    assert engine_inputs(args, {**kwargs, "added_cond_kwargs": {"text_embeds": torch.zeros(2, 32)}}, 77) is None
    assert engine_inputs((*args, kwargs["encoder_hidden_states"]), {"sample": args[0]}, 77) is None


def export_runner(unet: torch.nn.Module) -> Any:
    """A stand-in engine: the UNet's own eager forward (past the hook) with the engine's five inputs."""

    def run(sample: Any, timestep: Any, ehs: Any, text_embeds: Any, time_ids: Any) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        with torch.no_grad():
            return unet._call_impl(sample, timestep, ehs, added_cond_kwargs=added, return_dict=False)[0]

    return run


def test_the_hook_switches_from_eager_to_the_engine_and_back_on_failure(demo_pipe: Any, tmp_path: Path) -> None:
    unet = demo_pipe.unet
    args, kwargs = unet_call(demo_pipe)
    with torch.no_grad():
        eager = unet(*args, **kwargs)[0]
    builder = FakeBuilder()
    engines = BackgroundEngines(EngineCache(tmp_path), lambda w, h, b: fake_key(w, h, b), builder,
                                lambda payload: export_runner(unet))  # fmt: skip
    hook = TrtUnet(unet, engines).install()
    try:
        with torch.no_grad():
            first = unet(*args, **kwargs)[0]  # eager: the engine is only asked for
            assert hook.calls == {"engine": 0, "eager": 1}
            assert engines.wait(128, 64, 2, timeout=10) is not None and builder.built[0].bucket == (128, 64)
            second = unet(*args, **kwargs)[0]
            assert hook.calls == {"engine": 1, "eager": 1}
            as_dict = unet(*args, **{**kwargs, "return_dict": True}).sample
        torch.testing.assert_close(first, eager, rtol=0, atol=0)
        torch.testing.assert_close(second, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(as_dict, eager, rtol=1e-5, atol=1e-5)

        def broken(*inputs: Any) -> Any:
            raise RuntimeError("engine lost its context")

        engines._state[(128, 64, 2)] = broken
        with torch.no_grad():
            third = unet(*args, **kwargs)[0]  # fails on the engine, runs eager, every engine off
        torch.testing.assert_close(third, eager, rtol=0, atol=0)
        assert engines.disabled is not None and "lost its context" in engines.disabled
        assert engines.get(128, 64, 2) is None
    finally:
        hook.uninstall()
    assert unet._compiled_call_impl is None


def test_the_engine_runs_trt_jobs_eager_until_the_engine_is_ready(
    demo_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trt level in the real engine, with a fake TensorRT (runtime identity, builder and runner):
    the first job runs eager and asks for its bucket's engine; the next job runs on it with the same
    picture; a restarted engine loads it from the disk cache without building."""
    from test_engine import make_image, make_request

    from krita_sdxl.backend.engine import pixels
    from krita_sdxl.backend.engine.sdxl_engine import Engine
    from krita_sdxl.backend.speed import setup as speed_setup
    from krita_sdxl.backend.speed import speed_path as speed
    from krita_sdxl.backend.speed.levels import Plan

    builds: list[EngineKey] = []
    gate = threading.Event()  # the build finishes only when the test says so

    def fake_attach(pipe: Any, source: Any, device: str, folder: Path) -> TrtUnet:
        weights = trt_unet.weights_hash(trt_unet.weight_files(source), folder)
        runtime = {"tensorrt": "fake-1.0", "gpu": "CPU", "capability": "0.0"}
        key_for = trt_unet.key_factory(pipe, source, weights, torch.float32, runtime)

        def build(key: EngineKey) -> bytes:
            assert gate.wait(30)
            builds.append(key)
            return b"fake engine"

        engines = BackgroundEngines(EngineCache(folder), key_for, build, lambda payload: export_runner(pipe.unet))
        return TrtUnet(pipe.unet, engines).install()

    monkeypatch.setattr(trt_unet, "attach", fake_attach)
    monkeypatch.setenv(speed.OPTIONS_ENV, '{"vae_mode": null}')  # the VAE uncompiled: fast
    trt = Plan("trt", "trt", compile=True, unet="trt", buckets=True)
    monkeypatch.setattr(speed_setup, "choose", lambda setting, caps: trt)
    cache = demo_models.refiner.parent.parent
    noop = (lambda *a: None, lambda: False)
    req = make_request(make_image(120, 100))
    engine = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="trt", compile_cache=tmp_path / "cc")
    assert engine.speed is not None and engine.speed.trt is not None and engine.describe()["speed"]["level"] == "trt"
    first = pixels.samples(engine.refine(req, *noop)).astype(int)
    hook = engine.speed.trt
    assert hook.calls["engine"] == 0 and hook.calls["eager"] > 0
    assert engine.speed.stats()["trt_engines"] == {"256x256 b2": "pending"}
    gate.set()
    assert hook.engines.wait(256, 256, 2, timeout=30) is not None  # padded to the 256 px bucket
    assert [(k.width, k.height, k.batch) for k in builds] == [(256, 256, 2)]
    second = pixels.samples(engine.refine(req, *noop)).astype(int)
    assert hook.calls["engine"] > 0
    assert np.abs(first - second).max() <= 1
    assert engine.speed.stats()["trt_engines"] == {"256x256 b2": "ready"}
    assert list((tmp_path / "cc" / "tensorrt").glob("unet-256x256-b2-fp32-*.engine"))
    again = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="trt", compile_cache=tmp_path / "cc")
    assert again.speed is not None and again.speed.trt.engines.wait(256, 256, 2, timeout=30) is not None
    assert len(builds) == 1  # from the disk cache
    engines = hook.engines
    assert engine.unload("refiner") == (True, False)  # the engines and their thread go with the refiner
    engines._thread.join(10)
    assert not engines.running and engines.status() == {} and engine.speed is None
    assert engine.pipe.unet._compiled_call_impl is not None  # reloaded: a new hook, served from the cache
    assert engine.speed is not None and engine.speed.trt.engines.wait(256, 256, 2, timeout=30) is not None
    assert len(builds) == 1


def test_a_trt_level_that_cannot_start_compiles_the_unet_instead(
    demo_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from krita_sdxl.backend.engine.sdxl_engine import Engine
    from krita_sdxl.backend.speed import setup as speed_setup
    from krita_sdxl.backend.speed import speed_path as speed
    from krita_sdxl.backend.speed.levels import Plan

    def no_trt(*args: Any) -> Any:
        raise ImportError("libnvinfer.so.11: cannot open shared object file")

    monkeypatch.setattr(trt_unet, "attach", no_trt)
    monkeypatch.setenv(speed.OPTIONS_ENV, '{"backend": "eager", "vae_mode": null}')
    monkeypatch.setattr(speed_setup, "choose", lambda s, c: Plan("trt", "trt", compile=True, unet="trt", buckets=True))
    cache = demo_models.refiner.parent.parent
    engine = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="trt", compile_cache=tmp_path / "cc")
    assert engine.speed is not None and engine.speed.level == "compile" and engine.speed.trt is None
    assert engine.speed.compiled_counts().get("unet", 0) > 0  # the UNet's blocks compiled instead
    assert "speed trt runs as compile: TensorRT could not start: ImportError: libnvinfer" in caplog.text


def test_weights_hash_is_remembered_and_follows_the_files(tmp_path: Path) -> None:
    files = [tmp_path / "unet" / "diffusion_pytorch_model.safetensors"]
    files[0].parent.mkdir()
    files[0].write_bytes(b"weights v1" * 1000)
    memo = tmp_path / "engines"
    first = trt_unet.weights_hash(files, memo)
    assert first == trt_unet.weights_hash(files, memo) and (memo / trt_unet.HASH_MEMO).is_file()
    files[0].write_bytes(b"weights v2" * 1000)  # same size, new contents and time
    os.utime(files[0], ns=(1, 1))
    assert trt_unet.weights_hash(files, memo) != first
    with pytest.raises(ValueError, match="no UNet weight files"):
        trt_unet.weights_hash([], memo)


def test_the_onnx_export_matches_the_unet(demo_pipe: Any, tmp_path: Path) -> None:
    """The export the engine is built from, run by onnxruntime: the same noise prediction as the UNet."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    key = dataclasses.replace(KEY, width=128, height=64, text_dim=32, extra="pooled=32;time_ids=5")
    path = trt_unet.export_onnx(demo_pipe.unet, key, tmp_path, "cpu")
    inputs = trt_unet.example_inputs(key, "cpu", torch.float32)
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == list(trt_unet.INPUTS)
    got = session.run(None, {n: t.numpy() for n, t in zip(trt_unet.INPUTS, inputs, strict=True)})[0]
    with torch.no_grad():
        want = trt_unet.ExportUnet(demo_pipe.unet)(*inputs).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
