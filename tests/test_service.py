"""The real service in a subprocess, over real ZeroMQ sockets, with the real demo pipeline."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import msgpack
import pytest

from krita_sdxl.backend.cli.client import JobFailed, ServiceClient
from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.protocol import Image, ImageSpec


def rgba_image(w: int, h: int, seed: int = 0, order: str = "RGBA") -> Image:
    rng = random.Random(seed)
    return Image(ImageSpec(w, h, order, 8), rng.randbytes(w * h * 4))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    svc = start_service(["--demo", "--cache-dir", str(cache), "--log-level", "warning"])
    yield svc
    assert svc.stop() == 0, svc.log


@pytest.fixture
def client(service):
    with ServiceClient(service.endpoint, timeout=60) as c:
        yield c


def refine(client: ServiceClient, img: Image, **params) -> Image:
    params.setdefault("prompt", "a castle on a hill")
    params.setdefault("steps", 10)
    params.setdefault("strength", 0.5)
    return client.run(img, **params)


def test_hello_reports_capabilities(client):
    welcome = client.hello()
    caps = welcome["capabilities"]
    assert caps["protocol_version"] == 2
    assert caps["device"] == "cpu"
    assert "refine" in caps["modes"]
    assert any(m["role"] == "refiner" for m in caps["models"])
    assert caps["tiling"] == {"threshold": 2048 * 2048, "tile": 1024, "overlap": 128}


def test_same_seed_same_pixels_other_seed_different(client):
    img = rgba_image(64, 64, seed=1)
    a = refine(client, img, seed=42)
    b = refine(client, img, seed=42)
    c = refine(client, img, seed=43)
    assert a["seed"] == b["seed"] == 42
    assert bytes(a.images["image"].data) == bytes(b.images["image"].data)
    assert bytes(a.images["image"].data) != bytes(c.images["image"].data)
    assert bytes(a.images["image"].data) != bytes(img.data)


def test_random_seed_is_reported_and_reproduces(client):
    img = rgba_image(48, 40, seed=2)
    first = refine(client, img)
    again = refine(client, img, seed=first["seed"])
    assert bytes(first.images["image"].data) == bytes(again.images["image"].data)


def test_odd_size_comes_back_same_size_with_alpha_intact(client):
    img = rgba_image(333, 177, seed=3)
    out = refine(client, img, steps=4, strength=0.5, seed=1).images["image"]
    assert (out.spec.width, out.spec.height, out.spec.order, out.spec.depth) == (333, 177, "RGBA", 8)
    src, res = bytes(img.data), bytes(out.data)
    assert src[3::4] == res[3::4]  # alpha byte-identical
    assert src != res


def test_events_in_order_with_progress_for_every_step(client):
    img = rgba_image(64, 64, seed=4)
    job = client.submit(img, prompt="x", steps=10, strength=0.4, seed=5, preview=True)
    events = [e for e in client.events(job, timeout=60) if e.type != "credit"]  # credit: the upload's progress
    kinds = [e.type for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    accepted = events[0]
    assert (accepted["steps"], accepted["denoise_steps"]) == (10, 4)
    progress = [e for e in events if e.type == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    assert all(p["total"] == 4 for p in progress)
    preview = progress[-1].images["preview"].spec
    assert (preview.width, preview.height, preview.order) == (8, 8, "RGBA")


def test_zero_denoising_steps_are_raised_to_one(client):
    img = rgba_image(32, 32, seed=6)
    job = client.submit(img, prompt="x", steps=5, strength=0.1, seed=1)
    events = [e for e in client.events(job, timeout=60) if e.type != "credit"]
    assert events[0].type == "accepted"
    assert events[0]["denoise_steps"] == 1 and events[0]["steps"] == 10
    assert events[-1].type == "result"


def test_cancel_running_job_then_next_job_works(client):
    img = rgba_image(256, 256, seed=7)
    job = client.submit(img, prompt="x", steps=400, strength=1.0, seed=1)
    steps_seen = 0
    for event in client.events(job, timeout=60):
        if event.type == "progress":
            steps_seen = event["step"]
            if steps_seen == 2:
                client.cancel(job)
        final = event
    assert final.type == "cancelled", final
    assert 2 <= steps_seen <= 4  # stopped within a step or two of the request
    assert refine(client, rgba_image(32, 32), seed=1).type == "result"


def test_cancel_queued_job(client):
    img = rgba_image(256, 256, seed=8)
    running = client.submit(img, prompt="x", steps=300, strength=1.0, seed=1)
    queued = client.submit(rgba_image(16, 16), prompt="x", steps=2, strength=1.0, seed=1)
    seen: dict[str, list[str]] = {running: [], queued: []}
    while True:
        event = client.receive(timeout=60)
        if event.type == "credit":  # the uploads' progress
            continue
        seen[event.job].append(event.type)
        if event.job == queued and event.type == "accepted":
            client.cancel(queued)
        if event.job == queued and event.type == "cancelled":
            client.cancel(running)
        if event.job == running and event.type in ("cancelled", "result", "error"):
            break
    assert seen[queued] == ["accepted", "cancelled"]
    assert seen[running][-1] == "cancelled"


def test_two_clients_get_their_own_results(service):
    results: dict[str, Image] = {}
    errors: list[BaseException] = []

    def work(name: str, w: int, h: int) -> None:
        try:
            with ServiceClient(service.endpoint, timeout=60) as c:
                # both clients use the same job id on purpose: jobs are per client
                done = c.run(rgba_image(w, h, seed=w), job="job-1", prompt=name, steps=6, strength=0.5, seed=w)
                results[name] = done.images["image"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=a) for a in (("a", 72, 40), ("b", 40, 96))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert (results["a"].spec.width, results["a"].spec.height) == (72, 40)
    assert (results["b"].spec.width, results["b"].spec.height) == (40, 96)


def _head(**fields):
    return msgpack.packb({"v": 2, **fields})


_SPEC = {"width": 2, "height": 2}
_FLOAT_MASK = {"width": 2, "height": 2, "order": "L", "depth": 16, "sample": "float"}


@pytest.mark.parametrize(
    "frames, code, field",
    [
        ([b"\xc1not msgpack"], "bad_header", None),
        ([msgpack.packb([1, 2, 3])], "bad_header", None),
        ([_head(type="explode")], "unknown_type", "type"),
        ([msgpack.packb({"v": 99, "type": "hello"})], "version_mismatch", "v"),
        ([msgpack.packb({"v": 1, "type": "hello"})], "version_mismatch", "v"),
        ([msgpack.packb({"type": "hello"})], "missing_field", "v"),
        ([_head(type="submit", job="j", image={"width": 4, "height": 4}), b"x" * 64], "frame_mismatch", None),
        ([_head(type="submit", job="j", strength=1.5, image={"width": 2, "height": 2})], "bad_field", "strength"),
        ([_head(type="submit", job="j", steps="ten", image={"width": 2, "height": 2})], "bad_field", "steps"),
        ([_head(type="submit", job="j", image={"width": 2, "height": 2, "depth": 12})], "bad_field", "image.depth"),
        ([_head(type="submit", job="j", image={"width": 10**9, "height": 2})], "bad_field", "image.width"),
        ([_head(type="submit", job="j", mode="dream", image={"width": 2, "height": 2})], "unsupported", "mode"),
        ([_head(type="submit", job="j", image=_SPEC, mask=_FLOAT_MASK)], "bad_field", "mask.sample"),
        ([_head(type="cancel", job="nope")], "unknown_job", "job"),
        ([_head(type="chunk", job="nope", offset=0), b"x"], "unknown_job", "job"),
        ([_head(type="credit", job="nope", received=0)], "unknown_job", "job"),
    ],
)
def test_bad_input_gets_error_and_service_keeps_serving(client, frames, code, field):
    client.socket.send_multipart(frames)
    event = client.receive(timeout=10)
    assert event.type == "error"
    assert (event["code"], event["field"]) == (code, field), event.fields
    assert event["message"]
    assert refine(client, rgba_image(16, 16), steps=2, seed=1).type == "result"


def test_work_size_needs_both_sides(client):
    with pytest.raises(JobFailed) as info:
        client.run(rgba_image(8, 8), job="dup", prompt="x", work_width=8)
    assert info.value.field == "work_width"


def test_missing_model_stops_startup_with_instructions(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_HUB_OFFLINE="1")
    for args, needle in (
        ([], "stabilityai/stable-diffusion-xl-refiner-1.0"),
        (["--model", str(tmp_path / "nowhere")], "nowhere"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "krita_sdxl.backend.cli", "serve", "--endpoint", "tcp://127.0.0.1:*", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr
        assert "--demo" in proc.stderr and "--model" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_sigterm_cancels_running_job_and_tells_client(tmp_path_factory):
    svc = start_service(["--demo", "--cache-dir", str(tmp_path_factory.mktemp("cache2")), "--log-level", "warning"])
    try:
        with ServiceClient(svc.endpoint, timeout=60) as c:
            job = c.submit(rgba_image(256, 256), prompt="x", steps=400, strength=1.0, seed=1)
            queued = c.submit(rgba_image(16, 16), prompt="x", steps=2, seed=1)
            got: dict[str, str] = {}
            for _ in range(1000):
                event = c.receive(timeout=60)
                if event.type == "progress" and event.job == job and event["step"] == 1:
                    svc.proc.terminate()
                if event.type == "cancelled":
                    got[event.job] = event["reason"]
                if len(got) == 2:
                    break
        assert got == {job: "shutdown", queued: "shutdown"}
        t0 = time.monotonic()
        assert svc.proc.wait(30) == 0
        assert time.monotonic() - t0 < 30
    finally:
        svc.stop()


def test_linear_transfer_is_encoded_for_the_model_and_back(client):
    img = Image(ImageSpec(40, 24, "RGBA", 16, "uint"), random.Random(5).randbytes(40 * 24 * 8))
    srgb = refine(client, img, seed=3, transfer="srgb").images["image"]
    linear = refine(client, img, seed=3, transfer="linear").images["image"]
    assert (linear.spec.width, linear.spec.height, linear.spec.depth) == (40, 24, 16)
    assert bytes(srgb.data) != bytes(linear.data)
    src, out = bytes(img.data), bytes(linear.data)
    assert [src[i : i + 2] for i in range(6, len(src), 8)] == [out[i : i + 2] for i in range(6, len(out), 8)]
