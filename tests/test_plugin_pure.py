"""The Krita plugin's pure parts, without Krita: settings, formats, planning, jobs, backend command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))

from krita_sdxl.protocol import CLIENT, Image, ImageSpec, encode
from krita_sdxl.protocol.geometry import Box, Extent
from krita_sdxl.protocol.policy import paints_from_noise
from krita_sdxl_refiner.adapters.backend import invocation, is_python
from krita_sdxl_refiner.core import settings as settings_mod
from krita_sdxl_refiner.core.jobs import (
    Job,
    JobList,
    JobParams,
    JobState,
    Target,
    status_job_ids,
)
from krita_sdxl_refiner.core.pixelformat import UnsupportedFormat, any_visible, pixel_format, transfer_of
from krita_sdxl_refiner.core.plan import NothingToRefine, layer_name, nothing_visible, plan_refine, short_prompt
from krita_sdxl_refiner.core.settings import Settings
from krita_sdxl_refiner.ui.widgets import describe_backend, format_bytes

# --- settings ------------------------------------------------------------------------------------


def store(values: dict[str, str]):
    return lambda key, default: values.get(key, default)


def test_defaults_when_the_store_is_empty():
    s = settings_mod.load(store({}))
    assert s == Settings()
    assert s.random_seed and s.source == "layer" and s.endpoint.startswith("tcp://")


def test_values_from_kritarc_strings():
    s = settings_mod.load(
        store(
            {
                "endpoint": " tcp://10.0.0.2:5588 ",
                "prompt": "  a castle ",
                "strength": "0.55",
                "steps": "40",
                "seed": "1234",
                "source": "canvas",
                "preview": "true",
                "guidance": "7.5",
            }
        )
    )
    assert s.endpoint == "tcp://10.0.0.2:5588"
    assert s.prompt == "  a castle "  # prompts are kept verbatim
    assert (s.strength, s.steps, s.seed, s.source, s.preview, s.guidance) == (0.55, 40, 1234, "canvas", True, 7.5)
    assert not s.random_seed


def test_bad_values_fall_back_or_clamp():
    s = settings_mod.load(
        store({"strength": "lots", "steps": "9999", "seed": "-7", "source": "moon", "preview": "maybe", "endpoint": ""})
    )
    assert s.strength == Settings().strength
    assert s.steps == 500
    assert s.seed == -1
    assert s.source == "layer"
    assert s.preview is False
    assert s.endpoint == settings_mod.DEFAULT_ENDPOINT
    assert settings_mod.load(store({"strength": "0", "guidance": "nan"})).strength == 0.01
    assert settings_mod.load(store({"guidance": "nan"})).guidance == Settings().guidance


def test_round_trip_and_save_writes_only_changes():
    s = Settings(prompt="x", strength=0.7, seed=42, preview=True)
    assert settings_mod.load(store(settings_mod.to_strings(s))) == s
    written: dict[str, str] = {}
    new = s.changed(prompt="y", steps=12)
    settings_mod.save(new, written.__setitem__, previous=s)
    assert written == {"prompt": "y", "steps": "12"}
    assert new.changed(strength=5).strength == 1.0


@given(st.dictionaries(st.sampled_from([f.name for f in Settings.__dataclass_fields__.values()]), st.text()))
@example({"steps": "INF", "seed": "-inf", "strength": "nan"})  # "INF" steps raised OverflowError at Krita start
def test_any_stored_strings_give_valid_settings(values):
    s = settings_mod.load(store(values))
    assert 0 < s.strength <= 1 and 1 <= s.steps <= 500 and s.source in settings_mod.SOURCES
    assert s.seed >= -1 and 0 <= s.guidance <= 50 and s.endpoint


# --- pixel formats -------------------------------------------------------------------------------


def test_krita_rgba_depths_map_to_wire_formats():
    assert pixel_format("RGBA", "U8").spec(3, 2) == ImageSpec(3, 2, "BGRA", 8, "uint")
    assert pixel_format("RGBA", "U16").spec(3, 2) == ImageSpec(3, 2, "BGRA", 16, "uint")
    assert pixel_format("RGBA", "F16").spec(3, 2) == ImageSpec(3, 2, "RGBA", 16, "float")
    assert pixel_format("RGBA", "F32").spec(3, 2) == ImageSpec(3, 2, "RGBA", 32, "float")
    assert pixel_format("RGBA", "F32").bytes_per_pixel == 16


@pytest.mark.parametrize("model,word", [("CMYKA", "CMYK"), ("LABA", "L*a*b*"), ("GRAYA", "greyscale")])
def test_other_colour_models_are_refused_with_a_message(model, word):
    with pytest.raises(UnsupportedFormat, match="Nothing was sent") as err:
        pixel_format(model, "U8")
    assert word in str(err.value)


def test_unknown_depth_is_refused():
    with pytest.raises(UnsupportedFormat, match="F64"):
        pixel_format("RGBA", "F64")


def test_transfer_curve_from_profile_name():
    assert transfer_of("sRGB-elle-V2-srgbtrc.icc") == "srgb"
    assert transfer_of("sRGB-elle-V2-g10.icc") == "linear"
    assert transfer_of("Rec2020-elle-V4-g10.icc") == "linear"
    assert transfer_of("sRGB built-in") == "srgb"


# --- planning ------------------------------------------------------------------------------------


def test_plan_with_a_selection_pads_scales_and_feathers():
    plan = plan_refine(Extent(2000, 2000), Box(0, 0, 2000, 2000), Box(500, 500, 300, 400), 0.5, 0.06, 0.1)
    assert plan.masked
    assert plan.crop.contains(Box(500, 500, 300, 400))
    assert plan.crop.width % 8 == 0 and plan.crop.height % 8 == 0
    assert abs(plan.work.pixel_count - 1024 * 1024) < 0.05 * 1024 * 1024  # small crop scaled up
    assert plan.feather == pytest.approx(0.1 * 500 * 0.5)


def test_plan_without_selection_uses_the_layer_bounds_at_native_size():
    plan = plan_refine(Extent(1000, 800), Box(-50, 100, 600, 300), None, 0.3, 0.06, 0.1)
    assert plan == plan_refine(Extent(1000, 800), Box(0, 100, 550, 300), None, 0.9, 0.5, 0.5)
    assert plan.crop == Box(0, 100, 550, 300) and not plan.masked and plan.feather == 0
    assert plan.work == Extent(936, 512)  # short side raised to SDXL's smallest bucket side
    assert plan_refine(Extent(1000, 800), Box(0, 0, 900, 700), None, 0.3, 0.06, 0.1).work == Extent(904, 704)


def test_plan_large_layer_is_scaled_down():
    plan = plan_refine(Extent(4000, 3000), Box(0, 0, 4000, 3000), None, 0.3, 0.06, 0.1)
    assert plan.crop == Box(0, 0, 4000, 3000)
    assert plan.work.pixel_count <= 1.05 * 1024 * 1024


def test_nothing_to_refine():
    with pytest.raises(NothingToRefine):
        plan_refine(Extent(100, 100), Box(0, 0, 0, 0), None, 0.3, 0.06, 0.1)
    with pytest.raises(NothingToRefine):
        plan_refine(Extent(100, 100), Box(0, 0, 100, 100), Box(200, 200, 5, 5), 0.3, 0.06, 0.1)


def test_a_job_that_paints_from_noise_paints_the_canvas_of_an_empty_layer():
    plan = plan_refine(Extent(100, 80), Box(0, 0, 0, 0), None, 1.0, 0.06, 0.1, from_noise=True)
    assert plan.crop == Box(0, 0, 100, 80) and not plan.masked
    painted = plan_refine(Extent(100, 80), Box(10, 10, 30, 20), None, 1.0, 0.06, 0.1, from_noise=True)
    assert painted.crop == Box(10, 10, 30, 20)  # a painted layer: its own bounds, as for any mode


@pytest.mark.parametrize("depth", ["U8", "U16", "F16", "F32"])
def test_any_visible_reads_alpha_under_the_mask(depth: str):
    fmt = pixel_format("RGBA", depth)
    n, size = 64, fmt.depth // 8
    alpha_at = fmt.order.index("A") * size
    data = bytearray(b"\xff" * (n * fmt.bytes_per_pixel))  # colour everywhere ...
    for i in range(n):
        data[i * fmt.bytes_per_pixel + alpha_at : i * fmt.bytes_per_pixel + alpha_at + size] = bytes(size)
    assert not any_visible(fmt, data)  # ... but alpha 0: nothing shows
    top = alpha_at + size - 1  # the most significant byte of pixel 9's alpha (a small float is only there)
    data[9 * fmt.bytes_per_pixel + top] = 0x01
    assert any_visible(fmt, data)
    mask = bytearray(n)
    assert not any_visible(fmt, data, mask)  # visible only outside the selection
    mask[9] = 1
    assert any_visible(fmt, data, mask)


def test_paints_from_noise_agrees_with_the_backends_stage_plan():
    from krita_sdxl.backend.engine.stages import plan_job  # (the backend's one rule, which the plugin mirrors)

    for mode in ("refine", "generate", "two_stage"):
        for strength in (0.05, 0.3, 0.8, 0.99, 1.0):
            _, stages = plan_job(mode, 30, strength)
            assert paints_from_noise(mode, strength) == (not stages.from_source), (mode, strength)


def test_nothing_visible_names_the_source_and_the_way_out():
    layer = nothing_visible("layer", "layer “Sky” in castle.kra", True)
    assert layer.startswith("Nothing to refine: layer “Sky” in castle.kra is fully transparent in the selection.")
    assert "Source: Image" in layer and "Generate at strength 1" in layer and layer.endswith("Nothing was sent.")
    image = nothing_visible("image", "the visible image of castle.kra", False)
    assert "fully transparent. Select an area" in image and "Source: Image" not in image


def test_layer_names_start_with_what_tells_them_apart():
    """The Layers docker cuts names at its right edge: the number and the seed come first."""
    assert layer_name(3, "refine", "a castle at dawn", 1234) == "#3 · seed 1234 · a castle at dawn"
    assert layer_name(4, "refine", "", 7) == "#4 · seed 7 · Refine"
    assert layer_name(5, "two_stage", "x", None) == "#5 · Two-stage · x"
    assert layer_name(6, "generate", "a cat", 9) == "#6 · seed 9 · Generate · a cat"
    long = layer_name(12, "refine", "word " * 20, 99)
    assert long.startswith("#12 · seed 99 · word word") and long.endswith("…")
    assert len(short_prompt("word " * 20)) == 30 and short_prompt("a\n  b") == "a b"


# --- jobs ----------------------------------------------------------------------------------------


def make_job(job_id: str = "j1", seed: int | None = None) -> Job:
    plan = plan_refine(Extent(200, 200), Box(0, 0, 200, 200), Box(10, 10, 50, 50), 0.3, 0.06, 0.1)
    params = JobParams("refine", "a cat", "", 0.3, 30, 5.0, seed, True)
    return Job(job_id, params, plan, pixel_format("RGBA", "U8"), Target(None, None, "layer", "layer 1"))


def test_job_fields_encode_as_a_valid_submit():
    job = make_job(seed=5)
    fields = job.submit_fields()
    assert fields["seed"] == 5 and fields["work_width"] % 8 == 0 and fields["feather"] > 0
    assert fields["denoising_end"] == 0.8 and fields["keep_unmasked"] is True and fields["transfer"] == "srgb"
    crop = job.plan.crop
    spec = job.fmt.spec(crop.width, crop.height)

    frames = encode(CLIENT, "submit", images={"image": Image(spec, bytes(spec.byte_length))}, **fields)
    assert len(frames) == 1  # the header: the pixels follow in chunks


def test_a_large_uploads_progress_counts_the_bytes_the_service_holds():
    job = make_job()
    job.images = {"image": Image(ImageSpec(1024, 2048, "BGRA", 8), bytes(1024 * 2048 * 4))}  # 8 MiB
    job.mark_sent()
    assert job.upload_percent == 0 and job.status_text == "Uploading 0% of 8 MiB…"
    assert job.on_event("credit", {"received": 2 * 1024 * 1024, "until": 6 * 1024 * 1024})
    assert job.upload_percent == 25 and job.status_text == "Uploading 25% of 8 MiB…"
    job.on_event("accepted", {"position": 0, "seed": 1, "steps": 30, "denoise_steps": 9})
    assert job.upload_percent is None and job.status_text == "Queued…"
    small = make_job("j2")
    small.images = {"image": Image(ImageSpec(64, 64, "BGRA", 8), bytes(64 * 64 * 4))}
    small.mark_sent()
    assert small.upload_percent is None and small.status_text == "Sent…"  # over before a bar could show it


def test_job_state_machine():
    job = make_job()
    assert job.state is JobState.waiting and "Waiting" in job.status_text
    job.mark_sent()
    assert job.state is JobState.sent
    job.on_event("accepted", {"position": 2, "seed": 77, "steps": 30, "denoise_steps": 9})
    assert (job.state, job.seed, job.total, job.position) == (JobState.queued, 77, 9, 2)
    assert "position 2" in job.status_text
    job.on_event("progress", {"step": 3, "total": 9})
    assert job.state is JobState.running and job.status_text == "Step 3/9"
    assert job.layer_name == "seed 77 · a cat"  # no number until a JobList holds it
    JobList().add(job)
    assert job.layer_name == "#1 · seed 77 · a cat"
    job.on_event("result", {"seed": 77, "elapsed": 1.25})
    assert job.state is JobState.done and job.step == 9 and "1.2" in job.status_text
    assert not job.on_event("error", {"message": "late"})  # finished jobs ignore events
    assert job.state is JobState.done


def test_job_errors_and_cancels():
    job = make_job()
    job.on_event("error", {"code": "out_of_memory", "message": "CUDA out of memory"})
    assert job.state is JobState.failed and "out of memory" in job.status_text
    job = make_job()
    job.images["image"] = b"pixels"
    job.on_event("cancelled", {"reason": "cancelled"})
    assert job.state is JobState.cancelled and job.message == "cancelled" and not job.images
    job = make_job()
    job.images["image"] = b"pixels"
    job.on_event("cancelled", {"reason": "shutdown"})  # the service stopped, not the artist: resubmittable
    assert job.state is JobState.lost and "stopped" in job.status_text and job.images


def test_job_list_current_and_pruning():
    jobs = JobList(keep=2)
    a, b, c = make_job("a"), make_job("b"), make_job("c")
    for j in (a, b, c):
        jobs.add(j)
    assert jobs.current() is a  # oldest unfinished
    b.on_event("progress", {"step": 1, "total": 3})
    assert jobs.current() is b  # the running one
    assert [j.id for j in jobs.waiting()] == ["a", "c"]
    assert [j.id for j in jobs.in_service()] == ["b"]
    for j in (a, b, c):
        j.fail("x")
    jobs.add(make_job("d"))
    assert [j.id for j in jobs] == ["b", "c", "d"]  # only the 2 newest finished kept
    assert jobs.get("zz") is None and jobs.get(None) is None


def test_status_ids_whatever_the_layout():
    fields = {"running": "a", "jobs": [{"job": "b", "state": "queued", "position": 1}, "c"], "queue_length": 3}
    assert {"a", "b", "c"} <= status_job_ids(fields)


# --- local backend command -----------------------------------------------------------------------


def test_backend_invocation():
    assert is_python("/usr/bin/python3.11") and is_python("C:/Py/python.exe") and not is_python("krita-sdxl")
    prog, args = invocation("krita-sdxl", "serve --demo", "tcp://127.0.0.1:5588")
    assert (prog, args) == ("krita-sdxl", ["serve", "--demo", "--endpoint", "tcp://127.0.0.1:5588"])
    prog, args = invocation("/venv/bin/python", "serve --endpoint tcp://0.0.0.0:1", "tcp://x:2")
    assert args == ["-m", "krita_sdxl.backend.cli", "serve", "--endpoint", "tcp://0.0.0.0:1"]
    assert invocation("krita-sdxl", "info", "tcp://x:2")[1] == ["info"]
    with pytest.raises(ValueError):
        invocation("  ", "serve", "tcp://x:2")


# --- docker text ---------------------------------------------------------------------------------


def test_describe_backend_from_welcome():
    caps = {
        "device": "cuda",
        "dtype": "float16",
        "gpu": "NVIDIA H100",
        "gpu_memory_total": 80 * 2**30,
        "gpu_memory_free": 70 * 2**30,
        "models": [{"role": "refiner", "name": "sdxl-refiner-1.0", "path": "/m"}],
        "modes": ["refine"],
    }
    text = describe_backend("krita-sdxl 0.1", caps)
    assert "cuda float16 · NVIDIA H100" in text and "70.0 GiB free of 80.0 GiB" in text
    assert "sdxl-refiner-1.0" in text
    assert describe_backend("", {"device": "cpu", "gpu_memory_total": None}) == "cpu"
    assert format_bytes(None) == "?" and format_bytes(5 * 2**20) == "5 MiB"


def test_whole_layer_goes_native_when_the_backend_tiles():
    big = plan_refine(Extent(4000, 3000), Box(0, 0, 4000, 3000), None, 0.3, 0.06, 0.1, native_large=True)
    assert big.work == Extent(4000, 3000) and big.crop == Box(0, 0, 4000, 3000)
    scaled = plan_refine(Extent(4000, 3000), Box(0, 0, 4000, 3000), None, 0.3, 0.06, 0.1)
    assert scaled.work.width * scaled.work.height <= 1.1 * 1024 * 1024
    sel = plan_refine(
        Extent(4000, 3000), Box(0, 0, 4000, 3000), Box(10, 10, 100, 100), 0.3, 0.06, 0.1, native_large=True
    )
    assert sel.masked and sel.work != sel.crop.extent  # selections still go to the model's size
