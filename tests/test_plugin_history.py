"""The results history's pure parts: the memory budget, "Again" jobs and thumbnails from raw pixels."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))

from krita_sdxl.protocol import Image, ImageSpec
from krita_sdxl.protocol.geometry import Box, Extent
from krita_sdxl_refiner.core.history import Entry, History
from krita_sdxl_refiner.core.jobs import Job, JobParams, Target
from krita_sdxl_refiner.core.pixelformat import pixel_format
from krita_sdxl_refiner.core.plan import plan_refine
from krita_sdxl_refiner.core.thumbs import rgba8_thumbnail, thumbnail_size

U8 = pixel_format("RGBA", "U8")
MB = 2**20


def make_job(source: bytes, seed: int | None = 7) -> Job:
    plan = plan_refine(Extent(200, 200), Box(0, 0, 200, 200), Box(10, 10, 50, 50), 0.3, 0.06, 0.1)
    params = JobParams("refine", "a cat", "", 0.3, 30, 5.0, seed, False)
    job = Job("j", params, plan, U8, Target("doc", "source-layer", "layer", "layer 1"))
    job.images = {"image": Image(ImageSpec(len(source) // 4, 1, "BGRA", 8, "uint"), source)}
    return job


def entry(entry_id: str, result_mb: float, source_mb: float, applied: bool = True) -> Entry:
    job = make_job(bytes(int(source_mb * MB)))
    return Entry(
        id=entry_id,
        name=entry_id,
        job=job,
        box=Box(0, 0, 1, 1),
        fmt=U8,
        profile="",
        target=job.target,
        data=bytes(int(result_mb * MB)),
        prompt="",
        seed=1,
        strength=0.3,
        mode="refine",
        applied=applied,
    )


def test_budget_drops_the_oldest_applied_pixels_first_and_keeps_the_newest():
    history = History(budget=10 * MB)
    a, b, c = entry("a", 2, 2), entry("b", 2, 2), entry("c", 3, 3)
    assert history.add(a) == [] and history.add(b) == []
    assert history.pixel_bytes() == 8 * MB
    dropped = history.add(c)  # 14 MB: the oldest gives up its pixels
    assert dropped == [a] and not a.has_pixels and not a.can_again and a.thumbnail is None
    assert b.has_pixels and b.can_again and c.has_pixels and c.can_again
    assert history.pixel_bytes() == 10 * MB
    huge = entry("huge", 30, 30)
    history.add(huge)  # alone over budget: the newest keeps everything anyway
    assert huge.has_pixels and huge.can_again and not b.has_pixels and not c.has_pixels
    assert [e.id for e in history.newest_first()] == ["huge", "c", "b", "a"]  # entries stay, pixels go


def test_a_result_never_applied_keeps_its_pixels_and_gives_up_only_its_source():
    history = History(budget=4 * MB)
    kept = entry("kept", 2, 2, applied=False)
    history.add(kept)
    history.add(entry("new", 2, 2))
    assert kept.has_pixels and not kept.can_again  # the result is never lost
    assert history.pixel_bytes() == 6 * MB  # over budget, but nothing else may go


def test_buffers_shared_by_one_capture_count_once():
    history = History(budget=100 * MB)
    first = entry("first", 1, 5)
    history.add(first)
    again_job = first.job.again()
    second = Entry(**{**first.__dict__, "id": "second", "job": again_job, "data": bytes(MB), "layer_ids": []})
    history.add(second)
    assert history.pixel_bytes() == (1 + 5 + 1) * MB  # the 5 MB source snapshot is shared


def test_again_reruns_the_same_capture_with_a_new_seed_above_the_earlier_results():
    job = make_job(b"captured", seed=42)  # 2 px
    again = job.again()
    assert again.id != job.id and again.capture_id == job.capture_id
    assert again.params.seed not in (None, 42) and again.params.prompt == job.params.prompt  # a new seed, drawn now
    assert again.images["image"].data == b"captured" and again.plan == job.plan
    assert again.target.node_id == "source-layer"
    history = History()
    e1 = entry("one", 0, 0)
    e1.job, e1.layer_ids = job, ["layer-1"]
    e2 = entry("two", 0, 0)
    e2.job, e2.layer_ids = again, ["layer-2"]
    history.add(e1)
    history.add(e2)
    assert history.layers_of_source(job.target, job.capture_id) == ("layer-2", "layer-1")


def test_a_new_result_goes_above_every_earlier_result_of_the_same_layer():
    """Three captures of one layer (three quick Refines): the third result's candidates are the first
    two results' layers, newest first; another layer's, or the same layer id in another document, not."""
    history = History()
    made = []
    for name, document, node in (("one", "doc", "src"), ("two", "doc", "src"), ("other", "doc", "x"),
                                 ("elsewhere", "doc2", "src")):  # fmt: skip
        e = entry(name, 0, 0)
        e.target = Target(document, node, "layer", "layer 1")
        e.job = None  # dropped to save memory: the rule holds without the job
        e.layer_ids = [f"layer-{name}"]
        history.add(e)
        made.append(e)
    third = make_job(b"new!")
    third.target = Target("doc", "src", "layer", "layer 1")
    assert history.layers_of_source(third.target, third.capture_id) == ("layer-two", "layer-one")
    canvas = Target("doc", None, "canvas", "the visible image")  # the visible image: a result goes on top
    assert history.layers_of_source(canvas, "another capture") == ()


# --- thumbnails ---------------------------------------------------------------------------------


def test_thumbnail_size():
    assert thumbnail_size(640, 480, 96) == (96, 72)
    assert thumbnail_size(30, 20, 96) == (30, 20)
    assert thumbnail_size(1, 5000, 96) == (1, 96)
    assert thumbnail_size(0, 10, 96) == (0, 0)


def test_u8_thumbnail_samples_the_right_pixels_in_rgba_order():
    w, h = 400, 300
    rows = []
    for y in range(h):
        rows.append(b"".join(bytes((x % 256, y % 256, 200 if x < w // 2 else 10, 255)) for x in range(w)))
    tw, th, rgba = rgba8_thumbnail(U8, "srgb", w, h, b"".join(rows), 40)
    assert (tw, th) == (40, 30) and len(rgba) == 40 * 30 * 4
    left, right = rgba[0:4], rgba[(40 - 1) * 4 : 40 * 4]
    assert left[0] == 200 and right[0] == 10  # red channel from the BGRA source's third byte
    assert left[3] == 255 and left[2] < 10  # blue = x of the sampled column (near the left edge)


@pytest.mark.parametrize("depth", ["U16", "F16", "F32"])
def test_linear_deep_formats_are_encoded_to_srgb(depth):
    fmt = pixel_format("RGBA", depth)
    w, h = 20, 10
    if depth == "U16":
        pixel = struct.pack("<4H", 0, 0x3000, 0xFFFF, 0xFFFF)  # B, G (linear 0.19), R, A
    else:
        code = "e" if depth == "F16" else "f"
        pixel = struct.pack(f"<4{code}", 1.0, 0.1875, 0.0, 1.0)  # R, G, B, A
    tw, th, rgba = rgba8_thumbnail(fmt, "linear", w, h, pixel * (w * h), 8)
    r, g, b, a = rgba[:4]
    assert (tw, th) == (8, 4)
    assert r == 255 and b == 0 and a == 255
    assert 115 <= g <= 122  # linear 0.19 is about 0.47 in sRGB, not 48/255


def test_wrong_buffer_size_is_refused():
    with pytest.raises(ValueError, match="expected"):
        rgba8_thumbnail(U8, "srgb", 10, 10, bytes(10), 8)
