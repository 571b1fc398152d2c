"""Upscale jobs through the real service (a subprocess, real ZeroMQ) on the demo model, with a tiny randomly
initialised ESRGAN saved to a file as its ``--upscaler``; and ``krita-sdxl refine --upscale`` as people type it.

Tiles are 256 px here (overlap 32) so that a few-hundred-pixel picture spans several tiles on a CPU."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_refused, krita_sdxl
from PIL import Image as PILImage

from krita_sdxl.backend.cli.client import JobFailed, ServiceClient
from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.backend.engine import pixels
from krita_sdxl.backend.engine.tiling import TilingConfig
from krita_sdxl.backend.engine.upscale import latent_tiles
from krita_sdxl.protocol import Image, ImageSpec

pytestmark = pytest.mark.slow

TILE, OVERLAP = 256, 32
FAST = {"steps": 4, "strength": 0.25, "guidance_scale": 1.0}  # one denoising step, no guidance: quick on a CPU


def tiny_esrgan(path: Path) -> Path:
    """A randomly initialised 4x ESRGAN (spandrel's RRDBNet), saved as a .pth state dict."""
    import torch

    from krita_sdxl.backend.engine.upscaler_model import import_spandrel

    import_spandrel(path)  # as the backend imports it (no torchvision needed)
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    torch.save(ESRGAN(num_filters=8, num_blocks=1, scale=4).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory) -> Path:
    return tiny_esrgan(tmp_path_factory.mktemp("upscaler") / "tiny_esrgan.pth")


@pytest.fixture(scope="module")
def service(demo_models, upscaler):
    tiles = ["--tile-size", str(TILE), "--tile-overlap", str(OVERLAP)]
    svc = start_service(["--demo", "--speed", "off", "--log-level", "warning", *tiles, "--upscaler", str(upscaler),
                         "--max-pixels", "512x512"], env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # fmt: skip
    yield svc
    assert svc.stop() == 0, svc.log


@pytest.fixture
def client(service):
    with ServiceClient(service.endpoint, timeout=300) as c:
        yield c


def picture(width: int, height: int, order: str = "BGRA", depth: int = 8, sample: str = "uint", seed: int = 0):
    """Smooth colour with some texture, an alpha ramp, and (float) a highlight at 2.5."""
    spec = ImageSpec(width, height, order, depth, sample)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    planes = {
        "R": x / width,
        "G": y / height,
        "B": 0.5 + 0.3 * np.sin(x / 5) * np.cos(y / 7),
        "A": 0.3 + 0.7 * x / width,
    }
    values = np.stack([planes[c] for c in order], axis=-1) + rng.normal(0, 0.02, (height, width, len(order)))
    values = np.clip(values, 0, 1)
    if sample == "float":
        values[height // 2, width // 2, :3] = 2.5
    else:
        values = np.rint(values * (2**depth - 1))
    return Image(spec, values.astype(pixels.numpy_dtype(spec)).tobytes())


def upscale(client: ServiceClient, image: Image, width: int, height: int, method: str = "lanczos", **params):
    events: list = []
    params = {**FAST, "seed": 1, **params}
    up = {"width": width, "height": height, "method": method}
    result = client.run(image, on_event=events.append, upscale=up, **params)
    return result.images["image"], events


def alpha_of(image: Image) -> np.ndarray:
    return pixels.samples(image)[..., image.spec.order.index("A")]


def test_welcome_describes_the_upscaler_and_the_tiles(client, upscaler):
    caps = client.hello()["capabilities"]["upscale"]
    assert caps == {"methods": ["auto", "lanczos", "model"], "tile": TILE, "overlap": OVERLAP,
                    "model": {"name": upscaler.name, "architecture": "ESRGAN", "scale": 4}}  # fmt: skip


@pytest.mark.parametrize(("order", "depth", "sample"), [("BGRA", 8, "uint"), ("RGBA", 16, "uint"),
                                                        ("RGBA", 32, "float"), ("RGB", 8, "uint")])  # fmt: skip
def test_the_result_has_the_upscaled_size_the_depth_and_the_enlarged_alpha(client, order, depth, sample):
    image = picture(72, 48, order, depth, sample)
    refined, events = upscale(client, image, 144, 96)
    plain, _ = upscale(client, image, 144, 96, strength=0.0)
    assert refined.spec == plain.spec == ImageSpec(144, 96, order, depth, sample)
    assert [e["total"] for e in events if e.type == "progress"] == [1]  # one tile, one step
    assert bytes(refined.data) != bytes(plain.data)  # refined, not only enlarged
    if "A" in order:  # the refine leaves the enlarged alpha exactly as it was
        assert np.array_equal(alpha_of(refined), alpha_of(plain))
    if sample == "float":  # highlights above 1 survive the enlargement and the refine
        assert pixels.samples(plain)[..., :3].max() > 1.5 and pixels.samples(refined)[..., :3].max() > 1.5


@pytest.mark.parametrize(("order", "mode", "size"), [("BGRA", "RGBA", (202, 134)), ("RGB", "RGB", (152, 101))])
def test_strength_0_is_exactly_pillows_lanczos_upscale(client, order, mode, size):
    image = picture(101, 67, order)
    out, events = upscale(client, image, *size, strength=0.0)
    assert not [e for e in events if e.type == "progress"]  # nothing ran through the model
    source = PILImage.frombytes(mode, (101, 67), bytes(image.data), "raw", order)
    expected = source.resize(size, PILImage.Resampling.LANCZOS).tobytes("raw", order)
    assert bytes(out.data) == expected


def test_the_same_seed_gives_the_same_picture_over_several_tiles(client):
    image = picture(160, 160, seed=3)  # 320x320: 2x2 tiles of 256 px
    a, events = upscale(client, image, 320, 320, seed=7)
    b, _ = upscale(client, image, 320, 320, seed=7)
    c, _ = upscale(client, image, 320, 320, seed=8)
    steps = [(e["step"], e["total"]) for e in events if e.type == "progress"]
    assert steps == [(n, 4) for n in range(1, 5)]  # progress counts tiles x steps
    assert bytes(a.data) == bytes(b.data) and bytes(a.data) != bytes(c.data)


def test_cancel_mid_tile_leaves_nothing_behind(client):
    image = picture(160, 160, seed=4)
    job = {"steps": 10, "strength": 0.3, "guidance_scale": 5.0, "seed": 11}  # 3 steps x 4 tiles = 12 UNet calls
    whole, _ = upscale(client, image, 320, 320, **job)
    job_id = client.submit(image, upscale={"width": 320, "height": 320, "method": "lanczos"}, **job)
    seen = []
    for event in client.events(job_id):
        seen.append(event.type)
        if event.type == "progress" and event["step"] == 2:  # the second of four tiles of the first step
            client.cancel(job_id)
    assert seen[-1] == "cancelled" and "result" not in seen, seen
    assert seen.count("progress") < 12
    client.send("status", job=None)
    status = client.receive(timeout=30)
    assert status.type == "status" and status["jobs"] == [] and status["running"] is None
    again, _ = upscale(client, image, 320, 320, **job)  # the engine was left as it was: the same picture
    assert bytes(again.data) == bytes(whole.data)


def test_a_tiny_esrgan_enlarges_before_the_refine(client, upscaler):
    import torch

    from krita_sdxl.backend.engine.upscaler_model import import_spandrel

    spandrel = import_spandrel(upscaler)

    image = picture(40, 30, "RGB")
    out, _ = upscale(client, image, 160, 120, method="model", strength=0.0)
    auto, _ = upscale(client, image, 160, 120, method="auto", strength=0.0)  # auto: the service's model
    lanczos, _ = upscale(client, image, 160, 120, strength=0.0)
    assert bytes(out.data) == bytes(auto.data) != bytes(lanczos.data)
    model = spandrel.ModelLoader().load_from_file(upscaler).eval()  # the same file, run here
    rgb = pixels.samples(image).astype(np.float32) / 255
    with torch.inference_mode():
        big = model(torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None])[0].permute(1, 2, 0).numpy()
    difference = np.abs(pixels.samples(out).astype(np.int32) - np.rint(big * 255).astype(np.int32))
    assert difference.max() <= 1  # a 4x model at 4x: its own pixels
    refined, _ = upscale(client, image, 160, 120, method="model")
    assert refined.spec == out.spec and bytes(refined.data) != bytes(out.data)


def test_seams_of_a_refined_2x_upscale_of_a_gradient_are_not_seen(client):
    """Gradient energy (squared differences of neighbours) across the bands where tiles overlap is within
    10% of the energy inside tiles. Independent tiles blended after the fact fail this (their averaged
    noise makes a smoother band: 0.79 in a measurement); tiles denoised together pass."""
    y, x = np.mgrid[0:256, 0:256].astype(np.float32)
    rgb = np.stack([x / 255, y / 255, (x + y) / 510], axis=-1)
    image = Image(ImageSpec(256, 256, "RGB", 8), np.rint(rgb * 255).astype(np.uint8).tobytes())
    out, events = upscale(client, image, 512, 512)
    assert events[-2]["total"] == 9  # 3x3 tiles
    o = pixels.samples(out).astype(np.float64)
    bands = np.zeros(511, bool)  # differences between pixels i and i + 1 that lie in an overlap
    tiles = latent_tiles(512, 512, TilingConfig(TILE * TILE, TILE, OVERLAP))
    spans = sorted({(b.x * 8, b.width * 8) for b in tiles})  # the same along x and y: a square picture
    for (a, n), (b, _m) in itertools.pairwise(spans):
        bands[b - 1 : a + n] = True
    across = [((o[:, 1:] - o[:, :-1]) ** 2).mean(axis=(0, 2)), ((o[1:] - o[:-1]) ** 2).mean(axis=(1, 2))]
    seam = np.mean([d[bands].mean() for d in across])
    inside = np.mean([d[~bands].mean() for d in across])
    print(f"seam energy {seam:.1f}, inside {inside:.1f}, ratio {seam / inside:.3f}")
    assert abs(seam / inside - 1) <= 0.10


def test_the_limit_applies_to_the_result_and_names_the_largest_factor(client):
    with pytest.raises(JobFailed) as err:
        upscale(client, picture(300, 300), 600, 600)
    event = err.value.event
    assert event["code"] == "limit" and event["field"] == "upscale"
    assert "largest factor that fits is 1.7x (510x510 from 300x300)" in event["message"], event["message"]


def test_refine_upscale_from_the_command_line(service, tmp_path):
    source = tmp_path / "in.png"
    rng = random.Random(5)
    PILImage.frombytes("RGBA", (90, 60), rng.randbytes(90 * 60 * 4)).save(source)
    out = tmp_path / "out.png"
    done = krita_sdxl("refine", str(source), "--upscale", "2x", "--strength", "0", "--upscale-method", "lanczos",
                      "-o", str(out), "--endpoint", service.endpoint)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "180x120" in done.stdout
    with PILImage.open(source) as a, PILImage.open(out) as b:
        assert b.size == (180, 120) and b.tobytes() == a.resize((180, 120), PILImage.Resampling.LANCZOS).tobytes()
    fitted = tmp_path / "fit.png"
    done = krita_sdxl("refine", str(source), "--upscale-to", "300x", "--prompt", "sharp", *map(str, ("--steps", 4)),
                      "-o", str(fitted), "--endpoint", service.endpoint)  # fmt: skip
    assert done.returncode == 0, done.stderr
    with PILImage.open(fitted) as b:
        assert b.size == (300, 200)  # the aspect is kept
    too_big = krita_sdxl("refine", str(source), "--upscale", "10", "-o", str(tmp_path / "big.png"),
                         "--endpoint", service.endpoint)  # fmt: skip
    assert_refused(too_big, 2, "--upscale", "largest factor that fits is 6.96x (626x418 from 90x60)")  # before decoding
    assert not (tmp_path / "big.png").exists()


def test_a_file_that_is_not_an_upscaler_is_named_before_any_model_loads(tmp_path):
    import torch

    notes = tmp_path / "notes.pth"
    notes.write_bytes(b"not a model at all")
    other = tmp_path / "classifier.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    picture_file = tmp_path / "in.png"
    PILImage.new("RGB", (16, 16)).save(picture_file)
    served = krita_sdxl("serve", "--demo", "--upscaler", str(notes), "--endpoint", "tcp://127.0.0.1:*", timeout=60)
    assert_refused(served, 2, "--upscaler", str(notes), "cannot be read as a model file")
    local = krita_sdxl("refine", str(picture_file), "--local", "--demo", "--upscale", "2", "--upscaler", str(other),
                       "-o", str(tmp_path / "o.png"), timeout=60)  # fmt: skip
    assert_refused(local, 2, str(other), "is not an upscaler model")
    missing = krita_sdxl("serve", "--demo", "--upscaler", str(tmp_path / "nope.pth"), timeout=60)
    assert_refused(missing, 2, "nope.pth: no such file")
