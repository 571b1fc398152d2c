"""Modes, unload and the out-of-memory path through the real service (subprocess, real sockets)."""

from __future__ import annotations

import threading
from typing import Any

import msgpack
import numpy as np
import pytest

from krita_sdxl.backend.cli.client import JobFailed, ServiceClient
from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.backend.service.server import Service
from krita_sdxl.protocol import Image, ImageSpec


def rgba(width: int = 48, height: int = 32) -> Image:
    data = np.random.default_rng(1).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return Image(ImageSpec(width, height, "RGBA", 8), data.tobytes())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The first three UNet calls run out of memory (--simulate-oom 3), with one retry per job."""
    cache = tmp_path_factory.mktemp("cache")
    args = ["--demo", "--cache-dir", str(cache), "--log-level", "warning", "--speed", "off"]
    svc = start_service([*args, "--simulate-oom", "3", "--oom-retry", "--no-watermark", "--memory", "auto"])
    yield svc
    assert svc.stop() == 0, svc.log


def models(client: ServiceClient) -> dict[str, bool]:
    return {m["role"]: m["loaded"] for m in client.hello()["capabilities"]["models"]}


def test_out_of_memory_fails_the_job_with_advice_then_a_retry_succeeds(service: Any) -> None:
    with ServiceClient(service.endpoint, timeout=60) as client:
        caps = client.hello()["capabilities"]
        assert caps["modes"] == ["refine", "generate", "two_stage"]
        assert caps["memory"] == {"mode": "none", "requested": "auto", "reason": "no GPU offload on cpu"}
        assert caps["watermark"] == "disabled" and caps["oom_retry"] is True
        with pytest.raises(JobFailed) as failed:  # out of memory twice: on the first try and the retry
            client.run(rgba(), prompt="x", steps=4, strength=0.5, seed=1)
        assert failed.value.code == "out_of_memory"
        assert "smaller selection" in str(failed.value)
        done = client.run(rgba(), prompt="x", steps=4, strength=0.5, seed=1)  # fails once, the retry works
        assert done.type == "result"
        again = client.run(rgba(), prompt="x", steps=4, strength=0.5, seed=1)  # and the service goes on
        assert bytes(again.images["image"].data) == bytes(done.images["image"].data)


def test_generate_loads_the_base_and_counts_all_steps_then_unload(service: Any) -> None:
    with ServiceClient(service.endpoint, timeout=60) as client:
        assert client.unload("base")["was_loaded"] in (True, False)
        assert models(client) == {"refiner": True, "base": False}
        job = client.submit(rgba(), prompt="a castle", mode="generate", steps=10, strength=1.0, seed=2)
        events = [e for e in client.events(job, timeout=60) if e.type != "credit"]
        assert events[0].type == "accepted" and events[-1].type == "result", events[-1].fields
        assert events[0]["denoise_steps"] == 10
        assert [e["step"] for e in events if e.type == "progress"] == list(range(1, 11))
        assert {e["total"] for e in events if e.type == "progress"} == {10}
        out = events[-1].images["image"].spec
        assert (out.width, out.height) == (48, 32)
        assert models(client) == {"refiner": True, "base": True}
        assert client.unload("base") == {"model": "base", "was_loaded": True, "deferred": False}
        assert models(client) == {"refiner": True, "base": False}
        two = client.run(rgba(), prompt="a castle", mode="two_stage", steps=4, strength=0.5, seed=2)
        assert two.type == "result"
        client.socket.send_multipart([msgpack.packb({"v": 2, "type": "unload", "model": "vae"})])
        event = client.receive()
        assert (event.type, event["code"], event["field"]) == ("error", "bad_field", "model")


def test_generate_is_unsupported_without_a_base(demo_models: Any) -> None:
    engine = Engine.load(
        demo=True, base_model="none", device="cpu", cache_dir=demo_models.refiner.parent.parent, speed="off"
    )
    svc = Service(engine, "tcp://127.0.0.1:*")
    thread = threading.Thread(target=svc.serve_forever, daemon=True)
    thread.start()
    try:
        with ServiceClient(svc.endpoint, timeout=30) as client:
            assert client.hello()["capabilities"]["modes"] == ["refine"]
            for mode in ("generate", "two_stage"):
                with pytest.raises(JobFailed) as failed:
                    client.run(rgba(), prompt="x", mode=mode, steps=4, seed=1)
                assert (failed.value.code, failed.value.field) == ("unsupported", "mode")
            assert client.run(rgba(), prompt="x", steps=4, strength=0.5, seed=1).type == "result"
    finally:
        svc.stop()
        thread.join(30)


def test_the_speed_path_warms_up_before_the_first_job(tmp_path: Any) -> None:
    """``serve`` with the speed path compiles it in a warm-up job on the worker thread (traced with the
    aot_eager backend here, to stay quick): the service answers meanwhile, and the first job runs after it
    on the compiled blocks, with no fallback to eager."""
    import json

    env = {"KRITA_SDXL_SPEED_OPTIONS": json.dumps({"backend": "aot_eager_decomp_partition"})}
    args = ["--demo", "--cache-dir", str(tmp_path / "cache"), "--log-level", "info", "--speed", "on",
            "--compile-cache", str(tmp_path / "cc"), "--no-watermark"]  # fmt: skip
    svc = start_service(args, env=env)
    try:
        with ServiceClient(svc.endpoint, timeout=120) as client:
            speed = client.hello()["capabilities"]["speed"]
            assert speed["enabled"] and speed["scope"] == "regional" and speed["compiled"]["unet"] > 2
            done = client.run(rgba(), prompt="x", steps=4, strength=0.5, seed=1)
            assert done.type == "result"
    finally:
        assert svc.stop() == 0, svc.log
    log = svc.log
    assert "warm-up done" in log and "failed" not in log, log[-3000:]
    assert log.index("warm-up done") < log.index("refine 48x32"), log[-3000:]
