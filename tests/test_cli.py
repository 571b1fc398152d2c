"""``krita-sdxl refine`` and ``info`` as a person runs them against a real service: the mistakes people
make, the files it writes (opened and checked), the progress it draws, Ctrl-C."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_refused, jobs_seen, krita_sdxl, rgba_picture, spawn
from PIL import Image as PILImage

from krita_sdxl.backend.cli.launcher import ServiceProcess, start_service
from krita_sdxl.protocol import PROTOCOL_VERSION


@pytest.fixture(scope="module")
def service(demo_models, tmp_path_factory) -> ServiceProcess:
    sock = tmp_path_factory.mktemp("sock") / "k.sock"
    svc = start_service(["--demo", "--speed", "off", "--max-prompt-chars", "100", "--endpoint", f"ipc://{sock}"])
    yield svc
    assert svc.stop() == 0, svc.log


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    return rgba_picture(tmp_path_factory.mktemp("img") / "in.png")


def test_help_reads_well():
    out = krita_sdxl("--help").stdout
    for word in ("serve", "refine", "info", "demo", "keys", "authorize", "examples:", "exit status:", "130"):
        assert word in out
    serve = krita_sdxl("serve", "--help").stdout
    for flag in ("--model", "--demo", "--device", "--config", "--endpoint", "--max-queue", "--curve-secret-key"):
        assert flag in serve
    assert "(default: 10.0)" in serve and "(default: 8192x8192)" in serve  # the defaults are shown
    refine = krita_sdxl("refine", "--help").stdout
    for serve_only in ("--max-queue", "--heartbeat-timeout", "--curve-secret-key", "--insecure", "--no-warmup"):
        assert serve_only not in refine
    assert "only with --local" in refine and "--server-key" in refine and "exit status:" in refine
    for command in ("serve", "refine", "demo", "info", "keys", "authorize"):
        assert options_without_help(krita_sdxl(command, "--help").stdout) == [], command


def test_version_and_the_demo_refusing_to_overwrite_its_result(tmp_path):
    version = krita_sdxl("--version")
    assert version.returncode == 0 and re.fullmatch(r"krita-sdxl \d+\.\d+\.\d+\S*\n", version.stdout), version
    same = krita_sdxl("demo", "-o", "x.png", "--save-input", "./sub/../x.png", cwd=tmp_path)
    assert_refused(same, 2, "--save-input ./sub/../x.png and -o x.png name the same file")
    assert not list(tmp_path.iterdir())


def test_a_one_step_job_draws_no_unknown_rate(service, picture, tmp_path):
    proc = krita_sdxl("refine", str(picture), "--endpoint", service.endpoint, "--steps", "1", "--strength", "1",
                      "-o", str(tmp_path / "o.png"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1/1" in proc.stderr and "?" not in proc.stderr, proc.stderr


def options_without_help(text: str) -> list[str]:
    """Option lines of --help with no description beside or below them."""
    lines, bare = text.splitlines(), []
    for i, line in enumerate(lines):
        m = re.match(r"^  (-[-\w]+)(?:, --[-\w]+)?(?: [A-Z_|{},\w-]+)?(\s{2,}\S.*)?$", line)
        if m and not m.group(2) and not (i + 1 < len(lines) and lines[i + 1].startswith(" " * 20)):
            bare.append(m.group(1))
    return bare


def test_refine_writes_where_asked_creating_the_folder(service, picture, tmp_path):
    out = tmp_path / "new" / "sub" / "out.png"
    proc = krita_sdxl("refine", str(picture), "--endpoint", service.endpoint, "--steps", "4", "--strength", "0.5",
                      "--seed", "9", "-o", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "seed 9" in proc.stdout
    with PILImage.open(out) as res, PILImage.open(picture) as src:
        assert (res.size, res.mode) == ((101, 67), "RGBA")
        assert res.getchannel("A").tobytes() == src.getchannel("A").tobytes()
    info = krita_sdxl("info", "--endpoint", service.endpoint)
    assert info.returncode == 0, info.stderr
    assert f"protocol    {PROTOCOL_VERSION}" in info.stdout and "refine" in info.stdout
    for noise in ("Loading pipeline", "Loading weights", "[transformers]", "Warning", "Traceback"):
        assert noise not in service.log, service.log  # the service's log is quiet at the default level


def test_jpeg_output_drops_alpha_with_a_note(service, picture, tmp_path):
    out = tmp_path / "out.jpg"
    proc = krita_sdxl("refine", str(picture), "--endpoint", service.endpoint, "--steps", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "JPEG has no alpha channel" in proc.stderr
    assert "8-bit colour, seed" in proc.stdout and "with alpha" not in proc.stdout  # the summary says what was written
    with PILImage.open(out) as res:
        assert (res.format, res.mode, res.size) == ("JPEG", "RGB", (101, 67))


@pytest.mark.parametrize(
    "output, words",
    [
        (".", ["is a folder"]),
        ("{tmp}", ["is a folder"]),
        ("{tmp}/out_noext", ["no file extension", "out_noext.png"]),
        ("{tmp}/out.xyz", ["cannot write .xyz files", ".png, .tif, .jpg, .webp, .bmp or .gif"]),
        ("{picture}", ["is the input picture"]),
        ("{picture}/x.png", ["is a file"]),
    ],
)
def test_output_mistakes_are_refused_before_any_job(service, picture, tmp_path, output, words):
    before = jobs_seen(service.log)
    target = output.format(tmp=tmp_path, picture=picture)
    proc = krita_sdxl("refine", str(picture), "--endpoint", service.endpoint, "-o", target)
    assert_refused(proc, 2, *words)
    assert jobs_seen(service.log) == before  # nothing ran on the service
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--endpoint", "127.0.0.1:5588"], ["no scheme", "did you mean tcp://127.0.0.1:5588"]),
        (["--endpoint", "foo://bar"], ["unknown scheme 'foo'"]),
        (["--endpoint", "tcp://127.0.0.1:99999"], ["port"]),
        (["--timeout", "0"], ["--timeout", "above 0"]),
        (["--timeout", "-3"], ["--timeout", "above 0"]),
        (["--model", "x.safetensors"], ["--model applies only with --local"]),
        (["--device", "cpu", "--memory", "none"], ["--memory, --device apply only with --local"]),
        (["--config", "c.toml"], ["config file c.toml does not exist"]),  # refine reads its [client] table
        (["--strength", "1.5"], ["--strength", "<= 1"]),
        (["--steps", "0"], ["--steps"]),
        (["--work-size", "big"], ["--work-size"]),
        (["--mode", "paint"], ["--mode", "invalid choice"]),
        (["--server-key", "abc"], ["CURVE needs both"]),
        (["--negative-prompt", "-blurry"], ["--negative-prompt: expected one argument", "--negative-prompt=-VALUE"]),
    ],
)
def test_flag_mistakes_are_refused_before_any_job(service, picture, tmp_path, flags, words):
    before = jobs_seen(service.log)
    proc = krita_sdxl("refine", str(picture), "-o", str(tmp_path / "o.png"), "--endpoint", service.endpoint, *flags)
    assert_refused(proc, 2, *words)
    assert jobs_seen(service.log) == before
    assert not (tmp_path / "o.png").exists()


def test_missing_or_unreadable_input(tmp_path):
    proc = krita_sdxl("refine", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o.png"))
    assert_refused(proc, 2, "does not exist")
    (tmp_path / "text.png").write_text("not a picture")
    proc = krita_sdxl("refine", str(tmp_path / "text.png"), "-o", str(tmp_path / "o.png"))
    assert_refused(proc, 2, "cannot read")


def test_no_service_is_a_clear_failure(picture, tmp_path):
    proc = krita_sdxl("info", "--endpoint", "tcp://127.0.0.1:9", "--timeout", "1")
    assert_refused(proc, 1, "is `krita-sdxl serve` running")
    proc = krita_sdxl("info", "--endpoint", f"ipc://{tmp_path}/none.sock")
    assert_refused(proc, 1, "no service is listening")


def test_progress_draws_each_step_once_and_the_step_change_is_told(service, picture, tmp_path):
    proc = krita_sdxl("refine", str(picture), "--endpoint", service.endpoint, "--steps", "6", "--strength", "0.5",
                      "-o", str(tmp_path / "a.png"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"(?<![\d.])0step", proc.stderr) and "0/0" not in proc.stderr  # starts with the real total
    for step in (1, 2, 3):
        assert proc.stderr.count(f"| {step}/3 ") == 1, proc.stderr
    assert "| 0/3 " not in proc.stderr  # the bar starts at the first step (no rate from a step in no time)
    proc = krita_sdxl("refine", str(picture), "--endpoint", service.endpoint, "--steps", "5", "--strength", "0.01",
                      "-o", str(tmp_path / "b.png"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "strength 0.01 x 5 steps gives no denoising step: ran 1 of 100 steps" in proc.stderr


def test_prompt_limits_share_one_wording(service, picture, tmp_path):
    protocol = krita_sdxl("refine", str(picture), "--endpoint", service.endpoint, "--prompt", "x" * 9000,
                          "-o", str(tmp_path / "a.png"))  # fmt: skip
    line = assert_refused(protocol, 2, "prompt is 9000 characters long; the limit is 4000")
    ours = krita_sdxl("refine", str(picture), "--endpoint", service.endpoint, "--negative-prompt", "x" * 200,
                      "-o", str(tmp_path / "b.png"))  # fmt: skip
    line2 = assert_refused(ours, 2, "negative-prompt is 200 characters long; the limit is 100")  # before sending
    assert line.split("long;")[1].split(" 4000")[0] == line2.split("long;")[1].split(" 100")[0]
    assert not list(tmp_path.iterdir())


def test_ctrl_c_cancels_the_job_on_the_service(service, picture, tmp_path):
    out = tmp_path / "never.png"
    proc = spawn("refine", str(picture), "--endpoint", service.endpoint, "--steps", "500", "--strength", "1",
                 "-o", str(out))  # fmt: skip
    before = jobs_seen(service.log)
    deadline = time.monotonic() + 60
    while jobs_seen(service.log) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert re.search(r"interrupted: job \S+ cancelled on the service", stderr.splitlines()[-1]), stderr
    while "cancelled (cancelled)" not in service.log and time.monotonic() < sent + 10:
        time.sleep(0.05)
    assert "cancelled (cancelled)" in service.log  # the service stopped it, not a heartbeat timeout
    assert not out.exists()


def test_a_result_that_cannot_be_written_is_kept(tmp_path):
    from krita_sdxl.backend.cli.imageio import plan_output, read_picture
    from krita_sdxl.backend.cli.refine import save
    from krita_sdxl.backend.common.config import CommandFailed

    picture = read_picture(rgba_picture(tmp_path / "in.png"))
    out = plan_output(tmp_path / "later" / "out.png", picture)
    (tmp_path / "later").write_text("a file where the folder was meant to be")  # appears during the job
    with pytest.raises(CommandFailed, match="the result is kept in") as caught:
        save(out, picture.image, "job-7")
    kept = Path(str(caught.value).rsplit(" ", 1)[1])
    with PILImage.open(kept) as im:
        assert np.array_equal(np.asarray(im), np.asarray(PILImage.open(tmp_path / "in.png")))
    kept.unlink()


def test_the_model_refines_16_bit_and_float_pictures_at_their_depth(service, tmp_path):
    """Through the demo model (not the identity service): 16-bit grey stays 16-bit grey and is not clipped
    to white, float stays float and is not black."""
    y, x = np.mgrid[0:67, 0:101]
    grey16 = (x * 400 + y * 300 + 7).astype(np.uint16)
    PILImage.fromarray(grey16).save(tmp_path / "g16.png")
    PILImage.fromarray((grey16 / 65535).astype(np.float32), "F").save(tmp_path / "f.tif")
    for src, out, mode in (("g16.png", "o16.png", "I;16"), ("f.tif", "of.tif", "F")):
        proc = krita_sdxl("refine", str(tmp_path / src), "--endpoint", service.endpoint, "--steps", "4",
                          "--strength", "0.3", "-o", str(tmp_path / out))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        with PILImage.open(tmp_path / out) as im:
            values = np.asarray(im).astype(np.float64) / (65535 if mode == "I;16" else 1)
            assert im.mode == mode and im.size == (101, 67)
        assert (values >= 0.999).mean() < 0.5 and (values <= 0.001).mean() < 0.5
        assert 0.05 < values.mean() < 0.95
        if mode == "I;16":
            assert (np.asarray(PILImage.open(tmp_path / out)) % 257 != 0).mean() > 0.5  # real 16-bit values


def test_the_progress_bar_rates_steps_from_the_first_one_on(capsys: pytest.CaptureFixture[str]) -> None:
    """The bar is made at the first step event; counting that step as done in no time showed about
    190,000 step/s. It is now the bar's starting point, and the rate comes from the steps after it."""
    from krita_sdxl.backend.cli.refine import Progress

    progress = Progress()
    progress.step(1, 5)
    for step in (2, 3):
        time.sleep(0.1)
        progress.step(step, 5)
    progress.close()
    err = capsys.readouterr().err
    assert "1/5 [00:00]" in err and "?" not in err  # no rate from the first step, and no "?step/s" for it
    rates = [float(r) for r in re.findall(r"([\d.]+)step/s", err)]
    assert rates and all(2.0 < r < 20.0 for r in rates), rates  # about 10 step/s


def test_a_one_step_job_shows_no_unknown_rate(capsys: pytest.CaptureFixture[str]) -> None:
    from krita_sdxl.backend.cli.refine import Progress

    progress = Progress()
    progress.step(1, 1)
    progress.close()
    err = capsys.readouterr().err
    assert "1/1 [00:00]" in err and "?" not in err, err
