"""``krita-sdxl setup`` against a local server in the Hugging Face Hub's layout serving the demo refiner
under the real repo id (``HF_ENDPOINT``): the download lands where ``serve`` finds it, verified; an
interrupted download is continued with a Range request; a broken connection is retried; a damaged file
is refused; a full disk (a fake reading, and a real tmpfs where one can be mounted) says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hf_server import HubServer

from krita_sdxl.backend.setup import download as setup_download
from krita_sdxl.backend.setup.plan import events, hub

REPO = hub.REFINER_REPO
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def server(demo_models) -> Iterator[HubServer]:
    with HubServer({REPO: demo_models.refiner}) as s:
        yield s


def env_for(server: HubServer, hf_home: Path) -> dict[str, str]:
    return {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "krita_sdxl.backend.cli", "setup", *args]


def run_download(server: HubServer, hf_home: Path, *args: str) -> tuple[int, list[dict], str]:
    proc = subprocess.run(cli("download", "--json-progress", *args), env=env_for(server, hf_home),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    found = [e for e in map(events.parse, proc.stdout.splitlines()) if e]
    return proc.returncode, found, proc.stdout + proc.stderr


def resolve_gets(server: HubServer) -> list[str]:
    return [p for m, p, _ in server.state.requests if m == "GET" and "/resolve/" in p]


def test_download_lands_where_serve_finds_it_and_a_second_run_fetches_nothing(server, tmp_path, demo_models) -> None:
    code, found, out = run_download(server, tmp_path / "hf")
    assert code == 0, out
    plan = found[0]
    total = server.total_bytes(REPO)
    assert plan["event"] == "plan" and plan["needed"] == plan["total"] == total and plan["files"] == 12
    assert found[-1]["event"] == "done" and found[-2] == {"event": "progress", "done": total, "needed": total}
    assert {e["name"] for e in found if e["event"] == "verify"} == {e["name"] for e in found if e["event"] == "file"}
    cache = tmp_path / "hf" / "hub"
    assert hub.snapshot_ready(cache, REPO)
    snapshot = Path(found[-1]["snapshot"])
    for name, served in server.state.repos[REPO].items():
        assert (snapshot / name).read_bytes() == served.data
        assert hub.blob(cache, REPO, hub.RemoteFile(name, len(served.data), None, served.etag)).is_file()
    # `serve` resolves the bare repo id from this cache (the same lookup as the real SDXL refiner)
    probe = "from krita_sdxl.backend.models.sources import resolve_source; print(resolve_source('refiner').path)"
    offline = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    found_path = subprocess.run([sys.executable, "-c", probe], env=offline, capture_output=True, text=True, check=True)
    assert Path(found_path.stdout.strip()) == snapshot

    gets = len(resolve_gets(server))
    code, again, out = run_download(server, tmp_path / "hf")
    assert code == 0 and again[0]["needed"] == 0, out
    assert len(resolve_gets(server)) == gets  # nothing fetched again
    code, verified, out = run_download(server, tmp_path / "hf", "--verify")
    assert code == 0 and len([e for e in verified if e["event"] == "verify"]) == 12, out


def test_an_interrupted_download_continues_where_it_stopped(server, tmp_path) -> None:
    hf = tmp_path / "hf"
    server.state.rate = 400_000  # bytes/s for the weights: the 3.3 MB UNet takes 8 s
    proc = subprocess.Popen(cli("download", "--json-progress"), env=env_for(server, hf), stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    unet_started = False
    for line in proc.stdout:
        event = events.parse(line) or {}
        unet_started = unet_started or (event.get("event") == "file" and event["name"] == UNET)
        if unet_started and event.get("event") == "progress" and event["done"] > 1_000_000:
            break
    proc.kill()  # what the docker's Cancel does
    proc.wait()
    cache = hf / "hub"
    partials = list((hub.repo_folder(cache, REPO) / "blobs").glob("*.incomplete"))
    assert len(partials) == 1 and partials[0].stat().st_size > 0
    kept = partials[0].stat().st_size
    server.state.rate = None
    code, found, out = run_download(server, hf)
    assert code == 0, out
    plan = found[0]
    assert plan["needed"] < plan["total"]  # what was fetched before counts
    assert next(e for e in found if e["event"] == "file" and e["name"] == UNET)["resumed"] == kept
    assert f"bytes={kept}-" in server.ranges()  # continued with a Range request
    assert (hub.repo_folder(cache, REPO) / "snapshots").is_dir() and hub.snapshot_ready(cache, REPO)
    assert not list((hub.repo_folder(cache, REPO) / "blobs").glob("*.incomplete"))


def test_a_broken_connection_is_retried_from_where_it_broke(server, tmp_path) -> None:
    server.state.cut_after, server.state.cuts = 1_000_000, 2  # the UNet's first two responses break off
    code, _, out = run_download(server, tmp_path / "hf")
    assert code == 0, out
    assert len(server.ranges()) >= 2 and all(r.startswith("bytes=") for r in server.ranges())
    assert hub.snapshot_ready(tmp_path / "hf" / "hub", REPO)


def test_a_damaged_file_is_refused_and_fetched_anew_by_the_next_run(server, tmp_path) -> None:
    server.state.corrupt = {UNET}
    code, found, out = run_download(server, tmp_path / "hf")
    assert code == 1
    error = found[-1]
    assert error["event"] == "error" and "damaged" in error["why"] and "SHA-256" in error["why"], out
    assert "again" in error["what"]
    cache = tmp_path / "hf" / "hub"
    assert not list((hub.repo_folder(cache, REPO) / "blobs").glob("*.incomplete"))  # not kept to resume
    server.state.corrupt = set()
    code, found, out = run_download(server, tmp_path / "hf")
    assert code == 0 and hub.snapshot_ready(cache, REPO), out


def test_a_full_disk_is_refused_before_anything_is_fetched(server, tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(setup_download, "free_bytes", lambda path: 1_000_000)  # 1 MB free
    seen: list[tuple[str, dict]] = []
    with pytest.raises(setup_download.DownloadFailed) as info:
        setup_download.download([REPO], lambda kind, **f: seen.append((kind, f)), cache=tmp_path / "hub")
    assert "Not enough disk space" in info.value.why and "only 1 MB is free" in info.value.why
    assert "set HF_HOME" in info.value.why and "Nothing was downloaded" in info.value.what
    assert seen[0][0] == "plan" and seen[0][1]["free"] == 1_000_000
    assert resolve_gets(server) == []


def test_the_terminal_setup_checks_torch_downloads_and_says_how_to_start(server, tmp_path) -> None:
    env = {**env_for(server, tmp_path / "hf"), "KRITA_SDXL_TORCH_INDEX": "pip"}
    missing = subprocess.run(cli("--no-download"), env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "not in" in missing.stdout and "krita-sdxl setup" in missing.stdout
    done = subprocess.run(cli(), env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "this machine" in out and "fits this machine" in out and "to download into" in out
    assert "verified" in out and "start the service: krita-sdxl serve" in out
    assert "100%" in done.stderr  # the progress bar in bytes
    bad = subprocess.run(cli("--torch", "cu99"), env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'cu99'" in bad.stderr


ENOSPC_SCRIPT = """
set -e
mount -t tmpfs -o size={size} tmpfs "$HF_HOME"
"$PY" -m krita_sdxl.backend.cli setup download --json-progress > "$OUT/first.jsonl" 2>&1 &
pid=$!
for i in $(seq 600); do  # until part of the UNet is on disk
  [ -n "$(find "$HF_HOME" -name '*.incomplete' -size +100k)" ] && break
  sleep 0.05
done
avail=$(df --output=avail -B1 "$HF_HOME" | tail -1)
fallocate -l $((avail - 300000)) "$HF_HOME/filler"  # someone else fills the disk meanwhile
set +e
wait $pid
echo $? > "$OUT/first.rc"
rm "$HF_HOME/filler"
"$PY" -m krita_sdxl.backend.cli setup download --json-progress > "$OUT/second.jsonl" 2>&1
echo $? > "$OUT/second.rc"
"""


def test_a_disk_that_fills_up_mid_download_says_so_and_the_next_run_continues(server, tmp_path) -> None:
    """A real ENOSPC on a small tmpfs, mounted in a user namespace (where the kernel allows one)."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "-rm", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0 or not shutil.which("fallocate"):
        pytest.skip("cannot mount a tmpfs here (unshare -rm or fallocate unavailable)")
    hf, out = tmp_path / "hf", tmp_path / "out"
    hf.mkdir()
    out.mkdir()
    server.state.rate = 600_000  # time to fill the disk while the UNet arrives
    script = tmp_path / "enospc.sh"
    size = 140 * 2**20  # passes the check (needed + margin) with little to spare
    script.write_text(textwrap.dedent(ENOSPC_SCRIPT.format(size=size)))
    env = {**env_for(server, hf), "PY": sys.executable, "OUT": str(out)}
    started = time.monotonic()
    subprocess.run([unshare, "-rm", "bash", str(script)], env=env, check=True, timeout=180)
    first = [e for e in map(events.parse, (out / "first.jsonl").read_text().splitlines()) if e]
    second = [e for e in map(events.parse, (out / "second.jsonl").read_text().splitlines()) if e]
    story = f"{(out / 'first.jsonl').read_text()[-2000:]}\n{(out / 'second.jsonl').read_text()[-2000:]}"
    assert (out / "first.rc").read_text().strip() == "1", story
    error = first[-1]
    assert error["event"] == "error" and "is full, after" in error["why"] and "HF_HOME" in error["what"], story
    assert "continues where it stopped" in error["what"]
    assert (out / "second.rc").read_text().strip() == "0", story
    resumed = next(e for e in second if e["event"] == "file" and e["name"] == UNET)["resumed"]
    assert resumed > 0 and second[-1]["event"] == "done", story  # the bytes fetched before the disk filled count
    print(f"ENOSPC scenario: {time.monotonic() - started:.1f} s, resumed the UNet at {resumed} bytes")


def test_check_reports_this_environment(tmp_path) -> None:
    proc = subprocess.run(cli("check", "--json"), capture_output=True, text=True, timeout=120)
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and data["problems"] == []
    assert data["torch"].startswith("2.13.0") and data["device"] == "cpu" and data["backend_version"]


def text_download(server: HubServer, hf_home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli("download", *args), env=env_for(server, hf_home), capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_verified_only_when_every_checksum_was_checked(server, tmp_path) -> None:
    """New files are hashed as they are written; files already there get their size checked, and the
    command says so; --verify checks every checksum (a flipped byte in the cache is found there)."""
    hf = tmp_path / "hf"
    first = text_download(server, hf)
    assert first.returncode == 0 and f"{REPO}: verified (every file's checksum)" in first.stdout, first.stdout
    blob = next(p for p in (hub.repo_folder(hf / "hub", REPO) / "blobs").iterdir() if p.stat().st_size > 1_000_000)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    blob.write_bytes(bytes(data))
    again = text_download(server, hf)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{REPO}: sizes checked (`krita-sdxl setup download --verify` checks their checksums)" in again.stdout
    assert f"{REPO}: verified" not in again.stdout
    full = text_download(server, hf, "--verify")
    assert full.returncode == 1 and "is damaged" in full.stderr and "SHA-256" in full.stderr, full.stderr


NO_REREADING = """
import sys
from krita_sdxl.backend.setup.plan import hub
def no_rereading(*a, **k):
    raise AssertionError("a file just downloaded was read back to hash it")
hub.sha256_file = hub.git_blob_sha1 = no_rereading
from krita_sdxl.backend.cli.main import main
sys.exit(main(["setup", "download", "--json-progress"]))
"""


def test_a_download_is_checked_as_it_is_written_not_read_again(server, tmp_path) -> None:
    def run(hf_home: Path) -> tuple[int, list[dict], str]:
        proc = subprocess.run([sys.executable, "-c", NO_REREADING], env=env_for(server, hf_home), capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        return proc.returncode, [e for e in map(events.parse, proc.stdout.splitlines()) if e], proc.stdout + proc.stderr

    code, found, out = run(tmp_path / "hf")
    assert code == 0 and found[-1]["event"] == "done", out
    assert found[-1]["verified"] == found[-1]["files"] == 12
    server.state.corrupt = {UNET}  # a byte changed on the way: caught by the hash of the stream
    code, found, out = run(tmp_path / "hf2")
    assert code == 1 and "SHA-256" in found[-1]["why"], out


def fake_nvidia_smi(folder: Path, cuda: str) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho 'NVIDIA-SMI 450.00  Driver Version: 450.00  CUDA Version: {cuda}'\n")
    smi.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_the_terminal_setup_names_its_own_commands(tmp_path) -> None:
    """No docker button (Repair) in a terminal, and the --base a --no-download check was run with."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "KRITA_SDXL_TORCH_INDEX": "pip",
           **fake_nvidia_smi(tmp_path / "bin", "11.0")}  # fmt: skip
    proc = subprocess.run(cli("--base", "--no-download"), env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Repair" not in out and "run `krita-sdxl setup --fix-torch` to get the GPU build" in out
    assert out.count("to download: krita-sdxl setup --base)") == 2, out  # the refiner and the base
