"""The ``--speed`` levels: the choice over every combination of missing libraries, devices and compute
capabilities (pure), the probe of this machine, and the engine stepping down with one log line."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest

from krita_sdxl.backend.speed import levels as speed_levels
from krita_sdxl.backend.speed.levels import CHOICES, LADDER, Capabilities, choose, why_not

LIBS = ("triton", "tensorrt", "onnx", "torchao")
DEVICES = [("cpu", None), ("mps", None), ("cuda", (8, 0)), ("cuda", (8, 9)), ("cuda:1", (9, 0)), ("cuda", (7, 5))]

# What each level needs, written from the specification (not from the code under test).
NEEDS_CUDA = {"trt", "fp8"}
NEEDS_LIBS = {"compile": {"triton"}, "trt": {"tensorrt", "onnx"}, "fp8": {"torchao", "triton"}}


def can_run(level: str, device: str, cc: tuple[int, int] | None, missing: set[str], offloaded: bool) -> bool:
    cuda = device.startswith("cuda")
    if level == "off":
        return True
    if offloaded:
        return False
    if level in NEEDS_CUDA and not cuda:
        return False
    if level == "fp8" and (cc is None or cc < (8, 9)):
        return False
    libs = NEEDS_LIBS[level] - (set() if cuda else {"triton"})  # inductor makes C++ on the CPU
    return not (libs & missing)


def all_cases() -> list[tuple[str, str, Any, frozenset[str], bool]]:
    cases = []
    for setting, (device, cc), offloaded in itertools.product(CHOICES, DEVICES, (False, True)):
        for n in range(len(LIBS) + 1):
            for missing in itertools.combinations(LIBS, n):
                cases.append((setting, device, cc, frozenset(missing), offloaded))
    return cases


CASES = all_cases()


def test_every_combination_takes_the_highest_level_that_can_run() -> None:
    """7 settings x 6 devices x 16 library sets x offloaded or not: the level that runs is the first one
    down the ladder whose needs are met, with one reason for each level skipped and one summary line."""
    assert len(CASES) == 7 * 6 * 16 * 2
    for setting, device, cc, missing, offloaded in CASES:
        caps = Capabilities(device, cc, "GPU" if cc else None, {lib: f"{lib} is not installed" for lib in missing},
                            offloaded)  # fmt: skip
        plan = choose(setting, caps)
        where = (setting, device, cc, sorted(missing), offloaded)
        wanted = {"auto": "compile" if device.startswith("cuda") else "off", "on": "compile"}.get(setting, setting)
        if wanted == "draft":
            compiled = can_run("compile", device, cc, set(missing), offloaded)
            assert (plan.level, plan.compile, plan.step_cache) == ("draft", compiled, True), where
            assert len(plan.reasons) == (0 if compiled else 1), where
            continue
        chain = LADDER[LADDER.index(wanted) :]
        expected = next(level for level in chain if can_run(level, device, cc, set(missing), offloaded))
        assert plan.level == expected, where
        assert len(plan.reasons) == chain.index(expected), where
        assert plan.requested == setting
        assert (plan.summary() is None) == (expected == wanted), where
        assert plan.unet == {"trt": "trt", "fp8": "fp8"}.get(expected, "torch"), where
        assert plan.compile == (expected != "off") and plan.buckets == (expected == "trt"), where


@pytest.mark.parametrize(
    ("caps", "setting", "level", "says"),
    [
        (Capabilities("cuda", (8, 0), "NVIDIA A100", {}), "fp8", "trt", "this GPU is 8.0, NVIDIA A100"),
        (Capabilities("cuda", (9, 0), "H200", {"torchao": "torchao is not installed (pip install torchao)"}),
         "fp8", "trt", "pip install torchao"),
        (Capabilities("cuda", (9, 0), "H200", {"tensorrt": "tensorrt is not installed (x)", "torchao": "t"}),
         "fp8", "compile", "tensorrt is not installed"),
        (Capabilities("cpu"), "trt", "compile", "TensorRT needs an NVIDIA GPU (device cpu)"),
        (Capabilities("cuda", (9, 0), None, {"triton": "triton is not installed"}), "trt", "trt", None),
        (Capabilities("cuda", (9, 0), None, {"triton": "triton is not installed", "tensorrt": "no"}), "trt", "off",
         "compile: triton is not installed"),
        (Capabilities("cuda", (9, 0), None, {}, offloaded=True), "compile", "off", "memory mode offloads"),
        (Capabilities("cpu"), "auto", "off", None),
        (Capabilities("cpu"), "on", "compile", None),
    ],
)  # fmt: skip
def test_the_log_line_says_why(caps: Capabilities, setting: str, level: str, says: str | None) -> None:
    plan = choose(setting, caps)
    assert plan.level == level
    if says is None:
        assert plan.summary() is None
    else:
        line = plan.summary()
        assert line is not None and says in line and line.startswith(f"speed {setting} runs as {level}: ")
        assert "\n" not in line


def test_nonsense_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, on, off, compile, trt, fp8, draft"):
        choose("turbo", Capabilities("cuda"))


def test_why_not_is_none_for_levels_that_run() -> None:
    caps = Capabilities("cuda", (9, 0), "H100", {})
    assert [why_not(level, caps) for level in ("off", "compile", "trt", "fp8", "draft")] == [None] * 5


def test_probe_imports_only_what_the_chain_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe on this (CPU) machine: the libraries of every level down the ladder, reported with an
    install hint when missing or broken; never triton on the CPU."""
    asked: list[str] = []

    def fake_import(name: str) -> Any:
        asked.append(name)
        if name == "tensorrt":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        if name == "torchao":
            raise OSError("libcudart.so.13: cannot open shared object file")
        return object()

    monkeypatch.setattr(speed_levels.importlib, "import_module", fake_import)
    caps = speed_levels.probe("cpu", "fp8")
    assert asked == ["torchao", "tensorrt", "onnx"]
    assert caps.missing["tensorrt"].startswith("tensorrt is not installed (pip install tensorrt-cu13")
    assert "torchao failed to import: OSError: libcudart" in caps.missing["torchao"]
    assert caps.capability is None and not caps.cuda
    asked.clear()
    assert speed_levels.probe("cpu", "compile").missing == {} and asked == []
    assert speed_levels.probe("cpu", "off").missing == {} and asked == []


def test_the_engine_steps_down_with_one_log_line(demo_models: Any, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """--speed fp8 on this CPU: fp8 and trt need an NVIDIA GPU, so it runs as compile; one warning says so,
    and the service describes what runs and why."""
    from krita_sdxl.backend.engine.sdxl_engine import Engine
    from krita_sdxl.backend.speed import speed_path as speed

    monkeypatch.setenv(speed.OPTIONS_ENV, '{"unet_mode": null, "vae_mode": null}')  # no compiling: fast
    cache = demo_models.refiner.parent.parent
    with caplog.at_level(logging.INFO, logger="krita_sdxl.backend"):
        engine = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="fp8")
    lines = [r.getMessage() for r in caplog.records if "runs as" in r.getMessage()]
    assert lines == ["speed fp8 runs as compile: FP8 needs an NVIDIA GPU (device cpu); "
                     "TensorRT needs an NVIDIA GPU (device cpu)"]  # fmt: skip
    described = engine.describe()["speed"]
    assert described["level"] == "compile" and described["requested"] == "fp8"
    assert len(described["level_reasons"]) == 2
    off = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="auto")
    assert off.speed is None  # auto is off without CUDA, as before


def test_the_cli_takes_every_level_and_refuses_others() -> None:
    import argparse

    from krita_sdxl.backend.cli.options import add_settings, merge
    from krita_sdxl.backend.common.config import ConfigError, Settings

    parser = argparse.ArgumentParser()
    add_settings(parser, "serve")
    for level in CHOICES:
        assert parser.parse_args(["--speed", level]).speed == level
    assert merge(Settings(), {"speed": "draft"}, "config.toml", toml=True).speed == "draft"
    with pytest.raises(ConfigError, match=r"speed = 'tensorrt'.*one of auto, on, off, compile, trt, fp8, draft"):
        merge(Settings(), {"speed": "tensorrt"}, "config.toml", toml=True)


def test_serve_with_a_level_this_machine_lacks(demo_models: Any, tmp_path: Any) -> None:
    """As a person runs it: ``serve --speed trt`` on a machine without an NVIDIA GPU starts, logs once why it
    runs as compile, ``info`` shows it, and a refine works; a level that does not exist is refused."""
    from cli_helpers import assert_refused, krita_sdxl, rgba_picture

    from krita_sdxl.backend.cli.launcher import start_service
    from krita_sdxl.backend.speed import speed_path as speed

    env = {speed.OPTIONS_ENV: '{"unet_mode": null, "vae_mode": null}'}  # the compile level without compiling
    svc = start_service(["--demo", "--speed", "trt", "--no-warmup"], env=env)
    try:
        info = krita_sdxl("info", "--endpoint", svc.endpoint).stdout
        assert "speed       compile (asked for trt: TensorRT needs an NVIDIA GPU (device cpu))" in info
        out = tmp_path / "out.png"
        picture = rgba_picture(tmp_path / "in.png")
        proc = krita_sdxl("refine", str(picture), "--endpoint", svc.endpoint, "--steps", "4", "-o", str(out))
        assert proc.returncode == 0, proc.stderr
        assert out.is_file()
    finally:
        assert svc.stop() == 0, svc.log
    assert svc.log.count("runs as compile") == 1, svc.log
    assert_refused(krita_sdxl("serve", "--demo", "--speed", "turbo"), 2, "--speed", "trt", "fp8", "draft")
