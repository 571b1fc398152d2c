"""Picture files at their real depth, checked against ImageMagick (an independent PNG/TIFF codec)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import magick, magick_samples, ramp16
from PIL import Image as PILImage

from krita_sdxl.backend.cli.imageio import plan_output, read_picture, samples, write_picture
from krita_sdxl.backend.cli.png16 import encode_png16
from krita_sdxl.backend.common.config import ConfigError

W, H = 37, 23


def magick_file(tmp_path: Path, values: np.ndarray, channels: str, name: str, *options: str) -> Path:
    raw = tmp_path / "raw.bin"
    raw.write_bytes(values.astype(">u2").tobytes())
    out = tmp_path / name
    magick("-size", f"{W}x{H}", "-depth", "16", "-endian", "MSB", f"{channels}:{raw}", *options, str(out))
    return out


@pytest.mark.parametrize(
    "channels, name, options",
    [
        ("rgb", "a.png", ("-define", "png:compression-filter=4")),  # Paeth on every row
        ("rgba", "a.png", ("-define", "png:compression-filter=1")),  # Sub
        ("rgb", "a.tif", ("-compress", "lzw")),
        ("rgb", "b.tif", ("-compress", "none")),
    ],
)
def test_16_bit_colour_is_read_exactly(tmp_path, channels, name, options):
    values = ramp16(W, H, len(channels), seed=7)
    picture = read_picture(magick_file(tmp_path, values, channels, name, *options))
    assert (picture.image.spec.depth, picture.grey, picture.notes) == (16, False, ())
    assert np.array_equal(samples(picture.image), values)


def test_16_bit_grey_with_alpha_is_read_as_grey_and_written_back(tmp_path):
    values = ramp16(W, H, 4, seed=2)
    src = magick_file(tmp_path, values, "rgba", "tmp.png")  # then keep only grey + alpha
    la = tmp_path / "la.png"
    magick(str(src), "-colorspace", "Gray", "-define", "png:color-type=4", "-depth", "16", str(la))
    expected = magick_samples(la, "rgba", W, H)[..., [0, 3]]
    picture = read_picture(la)
    assert picture.grey and picture.image.spec.order == "RGBA" and picture.image.spec.depth == 16
    got = samples(picture.image)
    assert np.array_equal(got[..., 0], expected[..., 0]) and np.array_equal(got[..., 1], got[..., 0])
    assert np.array_equal(got[..., 3], expected[..., 1])
    out = tmp_path / "out.png"
    write_picture(plan_output(out, picture), picture.image)
    assert np.array_equal(magick_samples(out, "rgba", W, H)[..., [0, 3]], expected)


def test_our_16_bit_png_is_what_imagemagick_reads(tmp_path):
    for channels in ("gray", "rgb", "rgba"):
        values = ramp16(W, H, {"gray": 1, "rgb": 3, "rgba": 4}[channels], seed=5)
        path = tmp_path / f"{channels}.png"
        path.write_bytes(encode_png16(values))
        assert np.array_equal(magick_samples(path, channels, W, H), values), channels


def test_the_colour_profile_and_orientation_are_kept(tmp_path):
    icc = b"\x00\x00\x02\x0cfake-profile-bytes" * 8
    im = PILImage.new("RGB", (W, H), (10, 20, 30))
    im.putpixel((0, 0), (255, 0, 0))
    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    im.save(tmp_path / "in.jpg", quality=100, icc_profile=icc, exif=exif)
    picture = read_picture(tmp_path / "in.jpg")
    assert (picture.image.spec.width, picture.image.spec.height) == (H, W)  # shown upright
    out = tmp_path / "out.png"
    write_picture(plan_output(out, picture), picture.image)
    with PILImage.open(out) as back:
        assert back.info.get("icc_profile") == icc and back.size == (H, W)


@pytest.mark.parametrize(
    "name, words",
    [("out", "no file extension"), ("out.xyz", "cannot write .xyz"), ("dir/", "is a folder")],
)
def test_output_names_that_cannot_work(tmp_path, name, words):
    picture = read_picture(_rgba(tmp_path))
    with pytest.raises(ConfigError, match=words):
        plan_output(f"{tmp_path}/{name}", picture)


def _rgba(tmp_path: Path) -> Path:
    PILImage.new("RGBA", (W, H), (1, 2, 3, 4)).save(tmp_path / "in.png")
    return tmp_path / "in.png"
