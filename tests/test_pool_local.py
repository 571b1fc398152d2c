"""Issue 25: `serve --pool ray` with the local Ray it starts itself (no --ray-address), as on one GPU box:
what it opens to the network, what a killed raylet does to live jobs, and what is left after the service
goes. Each test starts its own service (a local Ray each: the slow part)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from attack import Peer, rgba
from pool_clients import FINAL, LONG, events, gone_within, kill_all, listening, loopback, names, run_job, tree

from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.backend.pool.shm import PREFIX, ROOT
from krita_sdxl.protocol import Message

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """Ray writes its token to ~/.ray/auth_token: a private HOME for each service here."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def shm_files(pid: int) -> list[Path]:
    return sorted(ROOT.glob(f"{PREFIX}{pid}-*"))


def test_a_local_pool_listens_on_loopback_and_a_killed_raylet_ends_every_live_job(demo_models, krita_sdxl_cache):
    """Items 7, 3 and 8. Every port of the local Ray the service starts is bound to loopback (three metrics
    ports listened on 0.0.0.0). Its raylet killed: the running and the queued job both end with model_error
    saying why (they were never answered, and the service died 15 s later without a word); the service
    exits 1 with one line; nothing it started is left (Ray's agents outlived it by a minute)."""
    svc = start_service(["--pool", "ray", "--replicas", "1", "--demo", "--cache-dir", str(krita_sdxl_cache)], 300)
    started = tree(svc.proc.pid)
    try:
        opened = listening({svc.proc.pid, *started})
        assert opened and not [a for a in opened if not loopback(a)], [a for a in opened if not loopback(a)]
        assert {"gcs_server", "raylet"} <= names(started), names(started)
        assert run_job(svc.endpoint).type == "result"
        files = shm_files(svc.proc.pid)
        assert len(files) == 2 and all(f.stat().st_mode & 0o777 == 0o600 for f in files), files
        started = tree(svc.proc.pid)  # with the replica and its workers
        raylet = next(p for p in started if names({p: started[p]}) == {"raylet"})
        with Peer(svc.endpoint) as peer:
            peer.send_job("running", rgba(64, 64, 1), seed=1, **LONG)
            peer.send_job("queued", rgba(64, 64, 2), seed=2, **LONG)
            events(peer, lambda e: e.type == "progress", 60)
            subprocess.run(["kill", "-9", str(raylet)], check=True)
            t = time.monotonic()
            ends: dict[str, Message] = {}

            def both_ended(event: Message) -> bool:
                if event.type in FINAL:
                    ends[event.job] = event
                return len(ends) == 2

            events(peer, both_ended, 30)
            heard = time.monotonic() - t
        for job in ("running", "queued"):
            event = ends[job]
            assert event.type == "error" and event["code"] == "model_error", (job, event.fields)
            assert "raylet is gone" in event["message"], event["message"]
        assert svc.proc.wait(30) == 1
        exited = time.monotonic() - t
        waited, alive = gone_within(started, 15)
        assert not alive, f"still running {waited:.1f} s after the service exited: {alive}"
        deadline = time.monotonic() + 10
        while "krita-sdxl serve: error:" not in svc.log and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = [line for line in svc.log.splitlines() if line.startswith("krita-sdxl serve: error:")]
        assert len(lines) == 1 and "raylet is gone" in lines[0], svc.log[-3000:]
        assert not shm_files(svc.proc.pid)
        print(f"jobs ended {heard:.1f} s after the kill, the service exited at {exited:.1f} s, its processes were "
              f"gone {waited:.1f} s later")  # fmt: skip
    finally:
        svc.stop()
        kill_all(started)


def test_sigterm_while_starting_leaves_no_ray_process(demo_models, krita_sdxl_cache):
    """Item 8: SIGTERM while the pool starts (Ray's node and agents up, the replicas not yet deployed) left
    Ray's two agents (about 210 MB) running for up to 95 s. Now nothing the service started outlives it."""
    cmd = [sys.executable, "-m", "krita_sdxl.backend.cli", "serve", "--endpoint", "tcp://127.0.0.1:*", "--pool",
           "ray", "--demo", "--cache-dir", str(krita_sdxl_cache)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 240
        while not {"ray::DashboardA", "ray::RuntimeEnv"} <= names(seen):  # the agents (comm: 15 characters)
            assert proc.poll() is None and time.monotonic() < deadline, names(seen)
            seen.update(tree(proc.pid))
            time.sleep(0.1)
        running = sorted(names(seen))
        proc.send_signal(signal.SIGTERM)
        t = time.monotonic()
        proc.wait(60)
        exited = time.monotonic() - t
        waited, alive = gone_within(seen, 15)
        assert not alive, f"still running {waited:.1f} s after the service exited: {alive}"
        print(f"SIGTERM while starting: exit {proc.returncode} after {exited:.1f} s; every process it started was "
              f"gone {waited:.1f} s later ({', '.join(running)})")  # fmt: skip
    finally:
        proc.kill()
        kill_all(seen)
