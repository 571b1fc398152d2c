"""Pictures keep their depth through ``krita-sdxl refine``: 16-bit and float files go to the service in
16-bit or float frames and come back at that depth, grey stays grey. The identity service returns the
pixels it was sent, so every written value can be compared with the input; files are made and read
back by ImageMagick where Pillow cannot (16-bit colour), an independent codec."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import assert_refused, krita_sdxl, magick, magick_samples, ramp16
from PIL import Image as PILImage

from krita_sdxl.backend.cli.launcher import start_service

W, H = 41, 30


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    svc = start_service(["--identity", "--endpoint", f"ipc://{tmp_path_factory.mktemp('s')}/id.sock"])
    yield svc
    assert svc.stop() == 0, svc.log


def refine(identity, src, out, *extra):
    proc = krita_sdxl("refine", str(src), "--endpoint", identity.endpoint, "-o", str(out), *extra)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_16_bit_grey_png_keeps_every_value(identity, tmp_path):
    values = ramp16(W, H, 1)[..., 0]
    src = tmp_path / "grey16.png"
    PILImage.fromarray(values).save(src)  # Pillow: mode I;16
    proc = refine(identity, src, tmp_path / "out.png")
    assert "16-bit grey" in proc.stdout
    with PILImage.open(tmp_path / "out.png") as out:
        assert out.mode == "I;16"
        assert np.array_equal(np.asarray(out), values)  # not clipped to white


def test_float_tiff_keeps_every_value(identity, tmp_path):
    rng = np.random.default_rng(3)
    values = rng.random((H, W), dtype=np.float32)
    src = tmp_path / "float.tif"
    PILImage.fromarray(values, "F").save(src)
    proc = refine(identity, src, tmp_path / "out.tif")
    assert "float grey" in proc.stdout
    with PILImage.open(tmp_path / "out.tif") as out:
        assert out.mode == "F"
        assert np.array_equal(np.asarray(out), values)  # not black


@pytest.mark.parametrize("channels, ext", [("rgb", "png"), ("rgba", "png"), ("rgb", "tif")])
def test_16_bit_colour_keeps_every_value(identity, tmp_path, channels, ext):
    values = ramp16(W, H, len(channels), seed=len(channels))
    raw = tmp_path / "in.raw"
    raw.write_bytes(values.astype(">u2").tobytes())
    src = tmp_path / f"in.{ext}"
    magick("-size", f"{W}x{H}", "-depth", "16", "-endian", "MSB", f"{channels}:{raw}",
           "-define", "png:compression-filter=5", str(src))  # fmt: skip
    out = tmp_path / "out.png"
    proc = refine(identity, src, out)
    assert "16-bit colour" in proc.stdout
    assert np.array_equal(magick_samples(out, channels, W, H), values)


def test_8_bit_grey_with_alpha_comes_back_grey(identity, tmp_path):
    la = PILImage.merge("LA", [PILImage.linear_gradient("L").resize((W, H)), PILImage.new("L", (W, H), 77)])
    la.save(tmp_path / "la.png")
    refine(identity, tmp_path / "la.png", tmp_path / "out.png")
    with PILImage.open(tmp_path / "out.png") as out:
        assert out.mode == "LA" and out.tobytes() == la.tobytes()


@pytest.mark.parametrize(
    "name, save, output, words",
    [
        ("grey16.png", lambda p: PILImage.fromarray(ramp16(W, H, 1)[..., 0]).save(p), "out.jpg", ("use .png",)),
        ("f.tif", lambda p: PILImage.new("F", (W, H), 0.5).save(p), "out.png", ("float grey", "use .tif")),
    ],
)
def test_a_format_that_cannot_hold_the_depth_is_refused_first(identity, tmp_path, name, save, output, words):
    save(tmp_path / name)
    proc = krita_sdxl("refine", str(tmp_path / name), "--endpoint", identity.endpoint, "-o", str(tmp_path / output))
    assert_refused(proc, 2, *words)
    assert not (tmp_path / output).exists()
