"""Issue 14, the GPU pool: `krita-sdxl serve --pool ray` in a subprocess, joined to a local Ray cluster this
test starts (2 CPUs), two CPU replicas of the demo model, real clients over real ZeroMQ sockets.

One cluster and one service for the whole module (starting them is most of its time); the test that kills
a replica runs last. Results are compared with the same job run by the single-process engine here.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zmq
from attack import Peer, header, rgba

from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.protocol import CLIENT, Image, Message, decode, encode

ray = pytest.importorskip("ray")  # the pool extra: pip install 'krita-sdxl[pool]' (CI installs it)
pytestmark = pytest.mark.slow

FINAL = ("result", "error", "cancelled")
JOB = {"prompt": "a castle on a hill", "steps": 4, "strength": 0.5}  # 2 denoising steps: quick on the demo model


@pytest.fixture(scope="module")
def cluster(krita_sdxl_cache, tmp_path_factory):
    """A local Ray cluster with a fixed number of CPUs, as `ray start --head --num-cpus 2` makes one, with
    token authentication (Ray's default for a new cluster); its token in RAY_AUTH_TOKEN, which the services
    started here inherit, and a private HOME, so that no ~/.ray/auth_token is read or written."""
    from ray._raylet import AuthenticationTokenLoader

    mode = os.environ.get("RAY_AUTH_MODE")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
            mp.delenv(name, raising=False)  # ray.init turns token mode on for a new cluster (RAY_AUTH_MODE=token)
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        mp.setenv("RAY_gcs_server_port_wait_time_s", "120")  # a busy CI machine starts the GCS in more than 30 s
        AuthenticationTokenLoader.instance().reset_cache()  # a token this process read before is not this one
        ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
        yield ctx.address_info["gcs_address"]
        ray.shutdown()
    if mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def pool(cluster, demo_models, krita_sdxl_cache):
    args = ["--pool", "ray", "--replicas", "2", "--ray-address", cluster, "--demo", "--log-level", "info"]
    svc = start_service([*args, "--cache-dir", str(krita_sdxl_cache)], timeout=300)
    yield svc
    assert svc.stop() == 0, svc.log[-4000:]


@pytest.fixture(scope="module")
def reference(demo_models, krita_sdxl_cache) -> Callable[..., bytes]:
    """The result the single-process engine gives for the same job (one torch thread, as in a replica)."""
    import torch

    from krita_sdxl.backend.engine.sdxl_engine import Engine

    engine = Engine.load(model=None, demo=True, device="cpu", cache_dir=krita_sdxl_cache)

    def run(image: Image, **fields: Any) -> bytes:
        msg = decode(CLIENT, encode(CLIENT, "submit", images={"image": image}, job="ref", **fields))
        msg.images = {"image": image}  # protocol 2: the pixels follow in chunks, filled in by the service
        req = RefineRequest.from_message(msg, fields["seed"], engine.timesteps)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return bytes(engine.refine(req, lambda *a: None, lambda: False).data)
        finally:
            torch.set_num_threads(threads)

    return run


def collect(peers: dict[str, Peer], jobs: dict[str, set[str]], timeout: float = 120.0) -> list[tuple[str, Message]]:
    """Every event (peer name, event) in arrival order until each peer's ``jobs`` have ended."""
    poller = zmq.Poller()
    for peer in peers.values():
        poller.register(peer.socket, zmq.POLLIN)
    open_jobs = {name: set(ids) for name, ids in jobs.items()}
    out: list[tuple[str, Message]] = []
    deadline, beat = time.monotonic() + timeout, 0.0
    while any(open_jobs.values()):
        assert time.monotonic() < deadline, f"jobs still open: {open_jobs}"
        if time.monotonic() > beat:  # live clients: a heartbeat a second
            for peer in peers.values():
                peer.send([header("heartbeat")])
            beat = time.monotonic() + 1.0
        ready = [n for n, p in peers.items() if p.pending()]  # events read while a job went up first
        ready += [next(n for n, p in peers.items() if p.socket is sock) for sock, _ in poller.poll(0 if ready else 200)]
        for name in ready:
            event = peers[name].recv(0)  # a result once all its chunks are in (each acknowledged)
            if event is None or event.type in ("heartbeat", "credit"):
                continue
            out.append((name, event))
            if event.type in FINAL:
                open_jobs[name].discard(event.job)
    return out


def ask(peer: Peer, frames: list[Any], reply: str, keep: list[Message] | None) -> Message:
    """Send a request and return its reply; other events that arrive first go to ``keep``."""
    peer.send(frames)
    while (event := peer.recv(30)) is not None:
        if event.type == reply:
            return event
        if keep is not None and event.type != "heartbeat":
            keep.append(event)
    raise AssertionError(f"no {reply}")


def welcome(peer: Peer, keep: list[Message] | None = None) -> dict[str, Any]:
    return ask(peer, [header("hello", client="pool test")], "welcome", keep)["capabilities"]


def status(peer: Peer, job: str | None = None, keep: list[Message] | None = None) -> dict[str, Any]:
    return ask(peer, [header("status", job=job)], "status", keep).fields


def jobs_per_replica(caps: dict[str, Any]) -> dict[str, int]:
    return {r["replica"]: r["jobs"] or 0 for r in caps["pool"]["replica_states"]}


def test_welcome_reports_the_pool(pool):
    with Peer(pool.endpoint) as peer:
        caps = welcome(peer)
    p = caps["pool"]
    assert (p["kind"], p["replicas"], p["gpus"], p["gpus_per_replica"], p["autoscaling"]) == ("ray", 2, 0, 0, False)
    assert len(p["replica_states"]) == 2
    for r in p["replica_states"]:
        assert r["state"] in ("idle", "busy") and r["device"] == "cpu" and r["pid"] > 0, r
        assert "refiner" in r["models"]
    assert caps["device"] == "cpu" and "generate" in caps["modes"]  # a replica's engine, as one process has it


def test_twelve_jobs_from_three_clients_correct_routed_and_fair(pool, reference):
    """Client a submits 10 jobs, then b and c one each (distinct seeds and sizes): every result is the
    single-process engine's for that job and reaches only its own client; b's and c's single jobs end
    before a's 10th; both replicas work."""
    sizes = [(48, 40), (64, 64), (40, 56), (72, 48), (56, 56), (64, 40), (40, 40), (48, 72), (80, 40), (56, 48)]
    plan = {
        "a": [(f"a{i}", sizes[i], 100 + i) for i in range(10)],
        "b": [("b0", (64, 56), 200)],
        "c": [("c0", (40, 64), 300)],
    }
    peers = {name: Peer(pool.endpoint) for name in plan}
    try:
        before = jobs_per_replica(welcome(peers["a"]))
        for name in ("a", "b", "c"):  # in this order: a's burst first
            for job, (w, h), seed in plan[name]:
                peers[name].send_job(job, rgba(w, h, seed), seed=seed, **JOB)
            if name == "a":
                time.sleep(0.2)  # a's jobs are queued before b's
        events = collect(peers, {name: {j for j, _, _ in jobs} for name, jobs in plan.items()})
        after = jobs_per_replica(welcome(peers["a"]))
    finally:
        for peer in peers.values():
            peer.close()
    results = [(name, e) for name, e in events if e.type == "result"]
    assert len(results) == 12, [(n, e.type, e.fields) for n, e in events if e.type in FINAL]
    for name, event in events:  # nothing of another client's: every event names one of its own jobs
        assert event.job in {j for j, _, _ in plan[name]}, (name, event.type, event.job)
    expected = {job: (name, size, seed) for name, jobs in plan.items() for job, size, seed in jobs}
    for name, event in results:
        owner, (w, h), seed = expected[event.job]
        assert name == owner and event["seed"] == seed
        out = event.images["image"]
        assert (out.spec.width, out.spec.height) == (w, h)
        assert bytes(out.data) == reference(rgba(w, h, seed), seed=seed, **JOB), event.job
    order = [e.job for _, e in results]
    assert order.index("b0") < order.index("a9") and order.index("c0") < order.index("a9"), order
    grown = {r: after.get(r, 0) - before.get(r, 0) for r in after}
    assert sum(grown.values()) == 12 and all(n > 0 for n in grown.values()), grown


def test_an_upscale_runs_on_a_replica_and_its_bigger_result_comes_back_whole(pool, reference):
    """An upscale job through the pool (48x40 -> 96x80: 4x the input's bytes, back through the slot's
    shared memory, sized for the result): the single-process engine's result for the same job, byte for byte."""
    fields = {**JOB, "strength": 0.3, "upscale": {"width": 96, "height": 80, "method": "lanczos"}}
    with Peer(pool.endpoint) as peer:
        peer.send_job("up", rgba(48, 40, 7), seed=7, **fields)
        (event,) = [e for _, e in collect({"p": peer}, {"p": {"up"}}) if e.type in FINAL]
    assert event.type == "result", event.fields
    out = event.images["image"]
    assert (out.spec.width, out.spec.height) == (96, 80)
    assert bytes(out.data) == reference(rgba(48, 40, 7), seed=7, **fields)


def test_status_shows_position_and_replica_and_a_cancel_reaches_the_replica(pool):
    """Three long jobs: two run (each on a replica, named in status), one waits at position 2. Cancelling
    the running ones stops their replicas at the next step: their jobs end `cancelled`, and the replicas
    report having stopped long before the last step."""
    long = {"prompt": "x", "steps": 500, "strength": 1.0}
    with Peer(pool.endpoint) as peer:
        for i in range(3):
            peer.send_job(f"long{i}", rgba(128, 128, i), seed=i, **long)
        started: set[str] = set()
        while len(started) < 2:  # both running jobs have made progress
            event = peer.recv(60)
            assert event is not None and event.type in ("accepted", "progress"), event
            if event.type == "progress":
                started.add(event.job)
        report = status(peer)
        running = [j for j in report["jobs"] if j["state"] == "running"]
        queued = [j for j in report["jobs"] if j["state"] == "queued"]
        assert sorted(j["job"] for j in running) == ["long0", "long1"] and all(j["position"] == 0 for j in running)
        assert [(j["job"], j["position"]) for j in queued] == [("long2", 2)] and "replica" not in queued[0]
        replicas = {r["replica"] for r in welcome(peer)["pool"]["replica_states"]}
        where = {j["job"]: j["replica"] for j in running}
        assert set(where.values()) == replicas, (where, replicas)  # one job on each replica
        for job in ("long2", "long0", "long1"):
            peer.send([header("cancel", job=job)])
        finals = {}
        for _ in range(400):
            event = peer.recv(60)
            assert event is not None
            if event.type in FINAL:
                finals[event.job] = (event.type, event.fields.get("reason"))
                if len(finals) == 3:
                    break
        assert finals == {f"long{i}": ("cancelled", "cancelled") for i in range(3)}
        # the replicas report their state with each job: run short jobs until both have reported again
        seen: dict[str, dict[str, Any]] = {}
        for i in range(40):
            peer.send_job(f"after{i}", rgba(32, 32, i), seed=i, **JOB)
            assert peer_final(peer, f"after{i}").type == "result"
            states = {r["replica"]: r for r in welcome(peer)["pool"]["replica_states"]}
            seen.update({r: s for r, s in states.items() if (s["cancelled"] or 0) >= 1})
            if set(seen) == replicas:
                break
    assert set(seen) == replicas, seen
    for state in seen.values():
        assert 0 < state["stopped_at"] < 250, state  # stopped long before the 500th step


def peer_final(peer: Peer, job: str, timeout: float = 60.0) -> Message:
    return until_final(peer, job, timeout)[-1]


def until_final(peer: Peer, job: str, timeout: float = 60.0) -> list[Message]:
    """Events until ``job``'s final one (included), with a heartbeat a second as a live client sends."""
    events = peer.events_until(lambda e: e.job == job and e.type in FINAL, timeout)
    assert events and events[-1].job == job and events[-1].type in FINAL, f"no final event for {job}"
    return events


def test_a_live_submit_stops_the_live_job_it_supersedes_on_its_replica(pool):
    """Issue 22 on the pool: a newer live job supersedes the running one; the dispatcher cancels its call, its
    replica stops at the next step and the job ends ``cancelled`` (``superseded``); the newer one runs."""
    long = {"prompt": "x", "steps": 500, "strength": 1.0, "live": True}
    with Peer(pool.endpoint) as peer:
        peer.send_job("live1", rgba(128, 128, 1), seed=1, **long)
        events = peer.events_until(lambda e: e.type in FINAL or (e.type == "progress" and e["step"] >= 2), 60)
        assert events and events[-1].type == "progress", events
        at = events[-1]["step"]
        peer.send_job("live2", rgba(32, 32, 2), seed=2, live=True, replaces="live1", **JOB)
        ends: dict[str, Message] = {}
        events = peer.events_until(lambda e: e.type in FINAL and ends.setdefault(e.job, e) and len(ends) == 2, 120)
    assert ends["live1"].type == "cancelled" and ends["live1"]["reason"] == "superseded", ends
    assert ends["live2"].type == "result", ends
    late = [e["step"] for e in events if e.job == "live1" and e.type == "progress"]
    assert not late or max(late) < at + 50, late  # stopped long before its 500th step


def test_generate_jobs_go_to_the_replica_that_holds_the_base(pool):
    """A mix of refine and generate jobs, one after another: the base is loaded on one replica only, and
    every generate job runs there (Ray Serve's multiplexed routing), so nothing is loaded twice."""
    generate = {"prompt": "x", "steps": 4, "strength": 1.0, "mode": "generate"}
    ran_on: list[str] = []
    with Peer(pool.endpoint) as peer:
        counts = jobs_per_replica(welcome(peer))
        for i in range(6):
            mode_fields = generate if i % 2 == 0 else JOB
            peer.send_job(f"mix{i}", rgba(64, 64, i), seed=i, **mode_fields)
            event = peer_final(peer, f"mix{i}")
            assert event.type == "result", event.fields
            now = jobs_per_replica(welcome(peer))
            ran = [r for r in now if now[r] > counts.get(r, 0)]
            assert len(ran) == 1, (counts, now)  # one job, one replica
            counts = now
            if i % 2 == 0:
                ran_on.extend(ran)
            if i == 0:
                time.sleep(3.0)  # the replica's new model id reaches Ray Serve's routers (well under a second)
        holders = [r["replica"] for r in welcome(peer)["pool"]["replica_states"] if "base" in r["models"]]
    assert len(holders) == 1 and set(ran_on) == set(holders), (ran_on, holders)


@ray.remote(num_cpus=0)
def as_a_replica(shipped: dict[str, Any]) -> tuple[str, Any, bool]:
    """In a Ray worker process, as a replica does: read the job's pixels (how, and whether without a copy)
    and hand back the reversed bytes as its result."""
    from krita_sdxl.backend.pool import transfer
    from krita_sdxl.backend.pool.shm import Mappings

    mappings = Mappings()
    try:
        req, how = transfer.land(shipped, mappings)
    except transfer.NeedStore:
        return "need_store", None, False
    data = req.image.data
    viewed = (isinstance(data, memoryview) and data.readonly) or transfer.in_store(np.asarray(data))
    result = Image(req.image.spec, bytes(memoryview(data).cast("B"))[::-1])
    return how, transfer.deliver(result, shipped, mappings), viewed


def test_pixels_go_through_shared_memory_here_and_the_object_store_to_another_host(cluster):
    """Issue 25 item 9: a 1024x1024 RGBA8 frame is copied once into the slot's shared memory; a Ray worker
    reads it without a copy and writes its result into the slot's out file (no object store: two 4 MiB
    ray.put a job cost 12 ms here). A worker that cannot open the files (another host: here they are gone)
    asks for the object store; the job shipped again reads one ray.put without a copy."""
    from krita_sdxl.backend.pool import transfer
    from krita_sdxl.backend.pool.shm import SlotBuffers

    image = rgba(1024, 1024, 7)
    msg = decode(CLIENT, encode(CLIENT, "submit", images={"image": image}, job="j", **JOB, seed=1))
    msg.images = {"image": image}  # protocol 2: the pixels follow in chunks, filled in by the service
    req = RefineRequest.from_message(msg, 1)
    buffers = SlotBuffers(f"test-{os.getpid()}")
    try:
        shipped = transfer.ship(req, buffers, via_store=False)
        assert shipped["image"]["ref"] is None
        how, packed, viewed = ray.get(as_a_replica.remote(shipped))
        assert (how, packed[1][0], viewed) == ("shm", "shm", True)
        assert bytes(transfer.receive(packed, buffers).data) == bytes(image.data)[::-1]
        buffers.retire()  # as seen from another host: no such files
        assert ray.get(as_a_replica.remote(shipped))[0] == "need_store"
        how, packed, viewed = ray.get(as_a_replica.remote(transfer.add_store(shipped, req)))
        assert (how, viewed) == ("store", True) and isinstance(packed[1], np.ndarray)
        assert bytes(transfer.receive(packed, None).data) == bytes(image.data)[::-1]
    finally:
        buffers.retire()


def test_a_replica_killed_mid_job_the_job_ends_and_the_next_ones_run(pool, reference):
    """kill -9 of the replica's process while it runs a job: the job runs again on the other replica (its
    result is the engine's, its progress never goes back), the next jobs succeed, Ray replaces the replica."""
    fields = {"prompt": "x", "steps": 300, "strength": 1.0, "seed": 9}
    with Peer(pool.endpoint) as peer:
        peer.send_job("victim", rgba(64, 64, 9), **fields)
        steps = []
        while not steps:
            event = peer.recv(60)
            assert event is not None and event.type in ("accepted", "progress")
            if event.type == "progress":
                steps.append(event["step"])
        kept: list[Message] = []
        replica = status(peer, "victim", kept)["jobs"][0]["replica"]
        pid = next(r["pid"] for r in welcome(peer, kept)["pool"]["replica_states"] if r["replica"] == replica)
        os.kill(pid, signal.SIGKILL)
        assert not [e for e in kept if e.type in FINAL], "the job ended before the kill: make it longer"
        steps += [e["step"] for e in kept if e.type == "progress"]
        rest = until_final(peer, "victim")
        steps += [e["step"] for e in rest if e.type == "progress"]
        event = rest[-1]
        assert event.type == "result", event.fields
        assert steps == sorted(set(steps)) and steps[-1] == 300, steps  # rising, no step twice
        assert bytes(event.images["image"].data) == reference(rgba(64, 64, 9), **fields)
        for i in range(3):
            peer.send_job(f"next{i}", rgba(48, 48, i), seed=i, **JOB)
            assert peer_final(peer, f"next{i}").type == "result"
        deadline = time.monotonic() + 120
        while True:  # Ray Serve starts a replacement replica
            states = welcome(peer)["pool"]["replica_states"]
            ids = {r["replica"] for r in states if r["state"] in ("idle", "busy")}
            if len(ids) == 2 and replica not in ids:
                break
            assert time.monotonic() < deadline, states
            time.sleep(1.0)
    assert "died while running it; running it again on another" in pool.log
