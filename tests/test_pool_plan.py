"""The GPU pool's pure parts (no Ray started): its settings as the command line checks them, its layout,
the routing key of generate jobs and what ``welcome`` reports about the replicas."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_refused, krita_sdxl

from krita_sdxl.backend.common.config import ConfigError, Settings
from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.pool.capabilities import ReplicaBook
from krita_sdxl.backend.pool.dispatcher import GIVEN_UP_S, Waiting
from krita_sdxl.backend.pool.failures import first_error_line, no_replica, start_failure
from krita_sdxl.backend.pool.health import RAYLET_GRACE_S, Check, Watchdog, raylet_check
from krita_sdxl.backend.pool.plan import (
    PoolPlan,
    check_pool,
    check_pool_name,
    default_pool_name,
    plan_pool,
    routing_key,
    shortfall,
)
from krita_sdxl.backend.pool.reach import Token, check_head, find_token
from krita_sdxl.backend.pool.reaper import Reaper, descendants, start_time
from krita_sdxl.backend.pool.shm import Mappings, SlotBuffers
from krita_sdxl.backend.pool.transfer import deliver, land, receive, ship
from krita_sdxl.protocol import CLIENT, Image, ImageSpec, decode, encode


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--replicas", "2"], ["--replicas", "add --pool ray"]),
        (["--ray-address", "auto"], ["--ray-address", "add --pool ray"]),
        (["--pool", "ray", "--replicas", "2", "--max-replicas", "4"], ["either --replicas"]),
        (["--pool", "ray", "--min-replicas", "3", "--max-replicas", "2"], ["--min-replicas 3 is more than"]),
        (["--pool", "ray", "--min-replicas", "1"], ["--min-replicas needs --max-replicas"]),
        (["--pool", "ray", "--device", "cpu"], ["--device cpu does not apply to --pool ray"]),
        (["--pool", "rey"], ["--pool", "invalid choice"]),
        (["--pool", "ray", "--ray-address", "127.0.0.1:9"], ["cannot reach the Ray cluster", "ray start --head"]),
    ],
)
def test_serve_refuses_pool_settings_that_do_not_fit(args, words):
    """Typed as a person would, refused before anything starts (no Ray, no model)."""
    assert_refused(krita_sdxl("serve", "--identity", "--endpoint", "tcp://127.0.0.1:*", *args, timeout=60), 2, *words)


def test_a_toml_pool_is_checked_like_the_flags():
    check_pool(Settings(pool="ray", replicas=2))  # fine: Ray Serve is installed with the test extras
    with pytest.raises(ConfigError, match="only apply to a pool"):
        check_pool(Settings(max_replicas=3))


def test_the_layout_follows_the_clusters_gpus():
    assert plan_pool(Settings(pool="ray"), 4.0) == PoolPlan(4, 4, 1)  # one replica per GPU
    assert plan_pool(Settings(pool="ray"), 0.0) == PoolPlan(1, 1, 0)  # CPU: one replica
    assert plan_pool(Settings(pool="ray", replicas=2), 0.0) == PoolPlan(2, 2, 0)
    scaling = plan_pool(Settings(pool="ray", min_replicas=1, max_replicas=3), 8.0)
    assert scaling == PoolPlan(1, 3, 1) and scaling.autoscaling and scaling.slots == 3
    options = scaling.deployment_options()
    assert options["ray_actor_options"]["num_gpus"] == 1 and options["max_ongoing_requests"] == 1
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    fixed = PoolPlan(2, 2, 0).deployment_options()
    assert fixed["num_replicas"] == 2 and "num_gpus" not in fixed["ray_actor_options"]
    assert "wait until hosts with GPUs join" in (shortfall(PoolPlan(4, 4, 1), 2.0) or "")
    assert shortfall(PoolPlan(2, 2, 1), 2.0) is None


def _request(mode: str) -> RefineRequest:
    image = Image(ImageSpec(8, 8, "RGBA", 8), bytes(256))
    msg = decode(CLIENT, encode(CLIENT, "submit", images={"image": image}, job="j", mode=mode, strength=1.0))
    msg.images = {"image": image}  # protocol 2: the pixels follow in chunks
    return RefineRequest.from_message(msg, 1)


def test_jobs_that_need_the_base_are_routed_by_it():
    assert routing_key(_request("generate")) == routing_key(_request("two_stage")) == "base"
    assert routing_key(_request("refine")) == ""


def test_the_book_merges_ray_serves_view_with_the_replicas_events():
    book = ReplicaBook(PoolPlan(2, 2, 1))
    book.refresh([{"replica": "a", "state": "RUNNING", "node": "10.0.0.1", "pid": 11},
                  {"replica": "b", "state": "STARTING", "node": "10.0.0.2", "pid": 12}])  # fmt: skip
    book.started({"replica": "a", "device": "cuda", "gpu": "H100", "models": ["refiner"], "jobs": 0}, "job-1")
    cap = book.capability()
    assert (cap["kind"], cap["replicas"], cap["gpus"], cap["autoscaling"]) == ("ray", 1, 1, False)
    a, b = cap["replica_states"]
    assert (a["replica"], a["state"], a["node"], a["gpu"]) == ("a", "busy", "10.0.0.1", "H100")
    assert (b["replica"], b["state"]) == ("b", "starting")
    book.finished({"replica": "a", "models": ["refiner", "base"], "jobs": 1})
    assert book.replica("a")["state"] == "idle" and book.replica("a")["models"] == ["refiner", "base"]
    book.lost("a")
    assert book.replica("a")["state"] == "lost"
    book.refresh([{"replica": "a", "state": "RUNNING"}, {"replica": "b", "state": "RUNNING"}])
    assert book.replica("a")["state"] == "lost"  # until Ray Serve stops listing it
    book.refresh([{"replica": "b", "state": "RUNNING"}, {"replica": "c", "state": "STARTING"}])
    assert [r["replica"] for r in book.capability()["replica_states"]] == ["b", "c"]
    assert book.capability()["replicas"] == 1


# -- issue 25: names, failures that speak, the reaper, the watchdog, shared memory, the checked join --------------


def test_each_service_names_its_own_pool():
    """Issue 25 item 2: the Ray Serve application is named per service: by host and endpoint (two live
    services of one host cannot share an endpoint), with the process id for a wildcard port."""
    a = default_pool_name("tcp://0.0.0.0:5588", "gpu-host", 11)
    assert a == default_pool_name("tcp://0.0.0.0:5588", "gpu-host", 12)  # a restart takes its predecessor's over
    assert a.startswith("krita-sdxl-gpu-host-") and check_pool_name(a) == a
    assert a != default_pool_name("tcp://0.0.0.0:5589", "gpu-host", 11)
    assert a != default_pool_name("tcp://0.0.0.0:5588", "other-host", 11)
    assert default_pool_name("tcp://127.0.0.1:*", "h", 11) != default_pool_name("tcp://127.0.0.1:*", "h", 12)
    assert check_pool_name(default_pool_name("ipc:///run/user/1000/k s", "höst name", 1))
    for bad in ("", "a b", "-x", "x" * 81, "a/b"):
        with pytest.raises(ValueError, match="letters, digits"):
            check_pool_name(bad)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--pool-name", "studio"], ["--pool-name", "add --pool ray"]),
        (["--pool", "ray", "--pool-name", "two words"], ["--pool-name two words", "letters, digits"]),
        (["--pool", "ray", "--replica-timeout", "0"], ["--replica-timeout 0", "seconds from 1"]),
    ],
)
def test_serve_refuses_pool_names_and_timeouts_that_do_not_fit(args, words):
    assert_refused(krita_sdxl("serve", "--identity", "--endpoint", "tcp://127.0.0.1:*", *args, timeout=60), 2, *words)


# What Ray Serve 2.60 says when a replica's constructor fails (its deployment's status message, as seen on a node
# that claims a GPU it does not have), trimmed; the replica's own line is raised by backend/pool/replica.py.
SERVE_STATUS = """The deployment failed to start 3 times in a row. This may be due to a problem with its \
constructor or initial health check failing. See controller logs for details. Error:
  File "/usr/lib/python3.11/concurrent/futures/_base.py", line 401, in __get_result
    raise self._exception
RuntimeError: Traceback (most recent call last):
  File ".../ray/serve/_private/replica.py", line 1867, in initialize
    await self._user_callable_wrapper.initialize_callable()
  File ".../backend/pool/replica.py", line 64, in __init__
    raise RuntimeError(f"{MARKER}: on {node}: {type(exc).__name__}: {exc}{_gpu_hint(gpu, node)}") from None
RuntimeError: krita-sdxl replica could not start: on 10.0.0.7: ConfigError: device 'cuda' is not available on \
this machine; available: cpu (Ray placed this GPU replica on 10.0.0.7, which claims a GPU, ...)"""
SERVE_ERROR = "Deploying application krita-sdxl-h-1 failed: Failed to update the deployments ['Replica']."


def test_a_replica_that_cannot_start_says_why_first():
    """Issue 25 item 6: the service's message carries the replica's first error line, not only Ray Serve's
    'Failed to update the deployments'."""
    message = start_failure(SERVE_ERROR, [SERVE_STATUS])
    assert message.startswith("the pool's replicas could not start: on 10.0.0.7: ConfigError: device 'cuda' is not")
    plain = SERVE_STATUS.replace("krita-sdxl replica could not start: on 10.0.0.7: ", "")  # another replica's words
    assert "ConfigError: device 'cuda' is not available" in start_failure(SERVE_ERROR, [plain])
    assert first_error_line(SERVE_ERROR) is None
    waiting = "Deployment 'Replica' has 1 replicas that have taken more than 30s to be scheduled. Resources: {'GPU': 1}"
    assert start_failure(SERVE_ERROR, [waiting]).endswith(f"; Ray Serve says: {waiting}")
    assert "The job waited 8 s" in no_replica(8.2, [waiting]) and "taken more than 30s" in no_replica(8, [waiting])
    assert "all were lost, and none has started again" in no_replica(5, [])


def test_a_job_waits_for_a_replica_only_so_long():
    """Issue 25 item 5 (and issue 20 item 9): with no replica running, a job gives up after the timeout, and
    after a few seconds when Ray Serve has given the deployment up."""
    book = ReplicaBook(PoolPlan(1, 1, 0))
    book.refresh([{"replica": "a", "state": "RUNNING"}], {"status": "HEALTHY", "message": ""})
    waiting = Waiting(book, timeout=0.3)
    assert waiting.gives_up() is None
    book.refresh([{"replica": "b", "state": "STARTING"}], {"status": "UPDATING", "message": "waiting for resources"})
    assert waiting.gives_up() is None  # the clock starts now
    time.sleep(0.35)
    assert "no replica of the GPU pool is running: waiting for resources" in (waiting.gives_up() or "")
    book.refresh([{"replica": "a", "state": "RUNNING"}], {"status": "HEALTHY", "message": ""})
    assert waiting.gives_up() is None  # a replica is back: the clock stops
    lost_host = ReplicaBook(PoolPlan(1, 1, 0))  # replicas died with their host: Ray Serve keeps trying
    lost_host.refresh([], {"status": "UNHEALTHY", "message": "ActorDiedError: The actor died unexpectedly."})
    assert not lost_host.given_up()
    failed = ReplicaBook(PoolPlan(1, 1, 0))
    failed.refresh([], {"status": "UNHEALTHY", "message": SERVE_STATUS})
    patient = Waiting(failed, timeout=3600)
    patient.gives_up()
    patient._none_since = time.monotonic() - GIVEN_UP_S  # waited for Ray Serve to be sure (5 s)
    assert "device 'cuda' is not available" in (patient.gives_up() or "")


def _parent_that_starts_children(tmp_path: Path) -> subprocess.Popen:
    """A process that starts a reaper, tells it about a shared-memory file and two children (one with a
    child of its own, as Ray's raylet has agents), then waits to be killed."""
    code = f"""
import subprocess, sys, time
from krita_sdxl.backend.pool.reaper import Reaper
reaper = Reaper()
reaper.follow()
open({str(tmp_path / "shm-file")!r}, "w").close()
reaper.watch_file({str(tmp_path / "shm-file")!r})
subprocess.Popen(["sleep", "300"])
subprocess.Popen([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '301']); time.sleep(300)"])
time.sleep(1.5)  # the reaper is told about them (every 0.25 s)
print("ready", flush=True)
time.sleep(300)
"""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_the_reaper_stops_what_a_killed_service_left():
    """Issue 25 item 8: kill -9 of the service leaves no process it started (Ray's agents outlived it by
    20 to 95 s) and no shared-memory file."""
    with tempfile.TemporaryDirectory() as tmp:
        parent = _parent_that_starts_children(Path(tmp))
        try:
            assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
            below = descendants(parent.pid)
            assert len(below) == 4, below  # the reaper, sleep, python and its sleep
            t = time.monotonic()
            parent.kill()
            parent.wait()
            while any(start_time(p) is not None for p in below) and time.monotonic() - t < 10:
                time.sleep(0.05)
            gone_after = time.monotonic() - t
            assert all(start_time(p) is None or _zombie(p) for p in below), below
            assert not (Path(tmp) / "shm-file").exists()
            print(f"everything the killed process started was gone {gone_after:.2f} s after the kill")
        finally:
            for p in descendants(parent.pid):
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)
            parent.kill()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_clean_close_stops_what_the_pool_left_and_the_reaper_goes():
    """Issue 25 item 8: at a clean close, what the pool started and left running (Ray agents that outlive a
    ``ray.shutdown``) is given ``settle`` seconds, then stopped; the reaper process itself ends."""
    reaper = Reaper()
    child = subprocess.Popen(["sleep", "30"])
    try:
        reaper.follow()
        time.sleep(0.6)  # the follower has seen the child
        watcher = reaper._proc
        reaper.done(settle=0.3)
        assert child.wait(5) == -signal.SIGKILL  # left running by the pool: stopped
        assert watcher is None or watcher.wait(5) is not None  # and the reaper is gone
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_the_watchdog_notices_a_raylet_that_is_gone(tmp_path):
    """Issue 25 item 3: the raylet's socket refusing connections is reported within about a second; a
    socket that accepts (a busy raylet) never is."""
    path = str(tmp_path / "raylet")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    lost: list[str] = []
    dog = Watchdog([Check("raylet", raylet_check(path), RAYLET_GRACE_S)], lost.append)
    dog.start()
    try:
        time.sleep(2.0)
        assert not lost
        server.close()  # the raylet died: its socket file stays, nobody listens
        t = time.monotonic()
        while not lost and time.monotonic() - t < 5:
            time.sleep(0.05)
        assert lost == ["Ray's node on this host stopped (its raylet is gone)"], lost
        assert time.monotonic() - t < 2.5
    finally:
        dog.stop()
        server.close()


def _replica_side(shipped: dict, reply: Connection) -> None:
    """Another process, as a replica is: reads the job's pixels and writes its result through the files."""
    mappings = Mappings()
    req, how = land(shipped, mappings)
    data = req.image.data
    assert isinstance(data, memoryview) and data.readonly  # a view of the file: no copy
    result = Image(req.image.spec, bytes(data)[::-1])
    reply.send((how, deliver(result, shipped, mappings)))


def test_pixels_cross_to_a_process_on_this_host_through_shared_memory():
    """Issue 25 item 9: the slot copies the frame once into its file (mode 0600), another process reads it
    without a copy and writes the result into the slot's out file; the next normal job reuses the files,
    a job that ended otherwise gets new ones; a name outside the pool's files is refused."""
    image = Image(ImageSpec(256, 128, "RGBA", 8), np.random.default_rng(1).integers(0, 256, 256 * 128 * 4, np.uint8))
    msg = decode(CLIENT, encode(CLIENT, "submit", images={"image": image}, job="j", strength=0.5))
    msg.images = {"image": image}  # protocol 2: the pixels follow in chunks
    req = RefineRequest.from_message(msg, 1)
    buffers = SlotBuffers(f"test-{os.getpid()}")
    ctx = multiprocessing.get_context("spawn")
    try:
        shipped = ship(req, buffers, via_store=False)
        assert shipped["image"]["ref"] is None and buffers.input is not None and buffers.output is not None
        assert stat.S_IMODE(os.stat(buffers.input.path).st_mode) == 0o600
        for _ in range(2):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_replica_side, args=(shipped, theirs))
            proc.start()
            how, packed = ours.recv()
            proc.join(60)
            assert how == "shm" and packed[1][0] == "shm", packed[1]
            assert bytes(receive(packed, buffers).data) == bytes(image.data)[::-1]
        names = (buffers.input.path, buffers.output.path)
        assert ship(req, buffers, via_store=False)["out"][0] == names[1].name  # reused
        buffers.retire()
        assert not names[0].exists() and not names[1].exists()
        assert ship(req, buffers, via_store=False)["out"][0] != names[1].name
        with pytest.raises(PermissionError):
            Mappings().get("passwd", 1)
    finally:
        buffers.retire()


def test_an_upscales_bigger_result_comes_back_through_shared_memory_too():
    """The slot's out file was sized for the input: an upscale's result (4x the bytes at 2x) did not fit and
    went through the object store (6 ms per 4 MiB). It is sized for the result now."""
    image = Image(ImageSpec(64, 48, "RGBA", 8), bytes(range(256)) * (64 * 48 * 4 // 256))
    fields = {"job": "u", "strength": 0.3, "upscale": {"width": 128, "height": 96, "method": "lanczos"}}
    msg = decode(CLIENT, encode(CLIENT, "submit", images={"image": image}, **fields))
    msg.images = {"image": image}
    req = RefineRequest.from_message(msg, 1)
    buffers = SlotBuffers(f"test-{os.getpid()}")
    try:
        shipped = ship(req, buffers, via_store=False)
        result = Image(ImageSpec(128, 96, "RGBA", 8), bytes([7]) * (128 * 96 * 4))
        packed = deliver(result, shipped, Mappings())
        assert packed[1][0] == "shm", "the upscale's result went through the object store"
        assert bytes(receive(packed, buffers).data) == bytes(result.data)
    finally:
        buffers.retire()


def test_a_head_that_accepts_but_never_answers_is_named_within_seconds(monkeypatch):
    """Issue 25 item 4: a frozen head (its port accepts, its gcs_server answers nothing) made `serve
    --ray-address` hang for more than 590 s; the join's check names it after the probe's deadline."""
    import ray._private.ray_constants as ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # Ray keeps 127.0.0.1 (else: the host's address)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        t = time.monotonic()
        with pytest.raises(ConfigError, match="accepts connections but does not answer within 1 s"):
            check_head(f"127.0.0.1:{port}", timeout=1.0)
        assert time.monotonic() - t < 10
    finally:
        server.close()


def test_the_token_is_found_where_ray_looks_for_it(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert find_token() == Token("home-token", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "t").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert find_token() == Token("path-token", str(tmp_path / "t"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert find_token() == Token("env-token", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"RAY_AUTH_TOKEN_PATH=.*cannot be read"):
        find_token()
