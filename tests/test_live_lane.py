"""Issue 22, the live lane: a ``submit`` with ``live`` supersedes its owner's older live job (the running one
stops at its next step boundary, the waiting one is dropped, both with ``cancelled`` reason ``superseded``);
``replaces`` names one job to supersede; normal jobs keep their order. The queue's rule alone, then a real
service over real sockets (a slow step-by-step engine, and the real demo pipeline for determinism), then the
pool's dispatcher path (the watcher cancels a superseded job's streaming call on its replica)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from attack import Peer, Running, SlowEngine, chunk_frames, final, header, rgba, submit_frames

from krita_sdxl.backend.service.jobs import Job, JobQueue, Owner
from krita_sdxl.backend.service.server import Service
from krita_sdxl.protocol import Message, Outgoing
from krita_sdxl.protocol.policy import capped_steps, denoise_steps

A, B = Owner(b"a" * 16), Owner(b"b" * 16)


def job(owner: Owner, name: str, live: bool = False) -> Job:
    return Job(owner, name, None, live=live)


def drain(q: JobQueue) -> list[str]:
    out = []
    while len(q):
        j = q.take(timeout=0)
        out.append(j.id)
        q.done(j)
    return out


# -- the queue's rule ------------------------------------------------------------------------------


def test_a_live_submit_drops_the_waiting_live_job_and_stops_the_running_one():
    q = JobQueue()
    q.submit(job(A, "live1", live=True))
    running = q.take(timeout=0)
    assert running.id == "live1"
    q.submit(job(A, "n1"))
    assert q.supersede(A, live=True, replaces=None) == []  # nothing waits yet; live1 is told to stop
    assert running.cancel.is_set() and running.cancel_reason == "superseded"
    q.submit(job(A, "live2", live=True))
    q.submit(job(A, "n2"))
    dropped = q.supersede(A, live=True, replaces=None)
    assert [j.id for j in dropped] == ["live2"]  # the waiting live job goes; the normal ones stay
    q.submit(job(A, "live3", live=True))
    q.done(running)
    assert drain(q) == ["n1", "n2", "live3"]  # normal jobs in their order; the newest live job last


def test_at_most_one_live_job_waits_and_one_runs_whatever_the_burst():
    q = JobQueue()
    q.submit(job(A, "live0", live=True))
    first = q.take(timeout=0)
    for i in range(1, 50):
        q.supersede(A, live=True, replaces=None)
        q.submit(job(A, f"live{i}", live=True))
        running, waiting = q.snapshot(A)
        assert len([j for j in running if not j.cancel.is_set()]) <= 1
        assert [j.id for _p, j in waiting] == [f"live{i}"]
    assert first.cancel_reason == "superseded"


def test_replaces_names_one_job_of_the_same_owner_only():
    q = JobQueue()
    q.submit(job(A, "x"))
    q.submit(job(B, "x"))  # the same id in another client: ids are per client
    q.submit(job(B, "y", live=True))
    assert [j.id for j in q.supersede(A, live=False, replaces="x")] == ["x"]
    assert q.supersede(A, live=True, replaces="y") == []  # B's jobs are out of A's reach, live or named
    assert q.supersede(A, live=False, replaces="unknown") == []  # gone already: nothing to do
    assert [(j.owner, j.id) for _p, j in q.snapshot()[1]] == [(B, "x"), (B, "y")]


def test_a_job_the_client_cancelled_keeps_its_reason():
    q = JobQueue()
    q.submit(job(A, "live1", live=True))
    running = q.take(timeout=0)
    q.cancel((A, "live1"))
    q.supersede(A, live=True, replaces=None)
    assert running.cancel_reason == "cancelled"


# -- the service, over real sockets ----------------------------------------------------------------


UPLOADS: dict[int, dict[str, Outgoing]] = {}  # per peer: the pixels of the jobs sent with ``send_job``
BACKLOG: dict[int, list[Message]] = {}  # per peer: events ``send_job`` read while its upload went on


def send_job(peer: Peer, name: str, image: Any, **fields: Any) -> None:
    """Submit as a client does: the header, then the pixels as the service's credit comes, until the upload
    ends (a connection uploads one job at a time); the events meanwhile wait for ``until``."""
    peer.send(submit_frames(name, image, **fields))
    UPLOADS.setdefault(id(peer), {})[name] = Outgoing(name, [image.data])
    BACKLOG.setdefault(id(peer), []).extend(_events(peer, lambda e: e.job == name, 30.0))


def until(peer: Peer, done: Callable[[Message], bool], timeout: float = 30.0) -> list[Message]:
    """``peer``'s events until ``done`` (included), heartbeats and credit skipped (answered with the
    job's chunks); fails after ``timeout`` seconds in all."""
    backlog = BACKLOG.setdefault(id(peer), [])
    for i, event in enumerate(backlog):
        if done(event):
            out, backlog[:] = backlog[: i + 1], backlog[i + 1 :]
            return out
    out, backlog[:] = list(backlog), []
    out += _events(peer, done, timeout)
    if not out or not done(out[-1]):
        raise AssertionError(f"not done within {timeout} s; events: {[(e.type, e.job) for e in out]}")
    return out


def _events(peer: Peer, done: Callable[[Message], bool], timeout: float) -> list[Message]:
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    beat = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        event = peer.recv(0.5)
        if time.monotonic() >= beat:
            peer.send([header("heartbeat")])
            beat = time.monotonic() + 0.5
        if event is None or event.type == "heartbeat":
            continue
        if event.type == "credit":
            upload = UPLOADS.get(id(peer), {}).get(event.job or "")
            if upload is not None:
                upload.grant(event["received"], event["until"])
                for offset, data in upload.chunks():
                    peer.send(chunk_frames(upload.job, offset, data))
            continue
        out.append(event)
        if done(event):
            break
    return out


def send_live(peer: Peer, name: str, **fields: Any) -> None:
    send_job(peer, name, rgba(32, 32), **{"steps": 10, "strength": 1.0, "live": True, **fields})


def send_normal(peer: Peer, name: str) -> None:
    send_job(peer, name, rgba(16, 16), steps=4, strength=1.0)


def live_frames(name: str, **fields: Any) -> list[Any]:
    """A live submit's header alone: for submits refused before any pixel is asked for."""
    return submit_frames(name, rgba(32, 32), **{"steps": 10, "strength": 1.0, "live": True, **fields})


def test_the_service_supersedes_within_one_step_and_keeps_normal_jobs():
    with Running(Service(SlowEngine(step_s=0.2), "tcp://127.0.0.1:*")) as running:
        with Peer(running.endpoint) as artist, Peer(running.endpoint) as other:
            send_live(artist, "live1", seed=1)
            send_normal(artist, "normal1")
            send_live(other, "theirs", seed=5)  # another client's live job: never touched
            events = until(artist, lambda e: e.job == "live1" and e.type == "progress" and e["step"] >= 3)
            seen = len(events)
            send_live(artist, "live2", replaces="live1")
            send_live(artist, "live3", replaces="live2")  # live2 still waits: dropped at once
            send_normal(artist, "normal2")
            events += until(artist, final("normal2"), timeout=30)
            theirs = until(other, final("theirs"), timeout=30)
    ends = {e.job: e for e in events if e.type in ("result", "error", "cancelled")}
    assert ends["live1"].type == "cancelled" and ends["live1"]["reason"] == "superseded"
    assert ends["live2"].type == "cancelled" and ends["live2"]["reason"] == "superseded"
    assert [e.type for e in events if e.job == "live2"] == ["accepted", "cancelled"]  # it never ran
    late = [e["step"] for e in events[seen:] if e.job == "live1" and e.type == "progress"]
    assert len(late) <= 2, f"live1 ran on for steps {late} after live2 was sent (0.2 s a step)"
    order = [e.job for e in events if e.type == "result"]
    assert order == ["normal1", "live3", "normal2"], order  # every job in the order its client sent it
    assert theirs[-1].type == "result" and theirs[-1].job == "theirs"


def test_a_live_job_that_fails_its_checks_supersedes_nothing():
    with Running(Service(SlowEngine(step_s=0.05), "tcp://127.0.0.1:*")) as running:
        with Peer(running.endpoint) as artist:
            send_live(artist, "live1")
            until(artist, lambda e: e.job == "live1" and e.type == "progress")
            BACKLOG.pop(id(artist), None)
            bad = artist.ask(live_frames("live2", replaces="live1", strength=2.0))
            assert bad is not None and bad.type == "error" and bad["field"] == "strength"
            frames = [header("submit", job="live3", live="yes", image={"width": 4, "height": 4})]
            forged = artist.ask(frames)
            assert forged is not None and forged.type == "error" and forged["field"] == "live"
            long_id = artist.ask(live_frames("live4", replaces="r" * 129))
            assert long_id is not None and long_id.type == "error" and long_id["field"] == "replaces"
            number = artist.ask(live_frames("live5", replaces=5))
            assert number is not None and number.type == "error" and number["field"] == "replaces"
            events = until(artist, final("live1"), timeout=30)
    assert events[-1].type == "result"  # nothing stopped live1


def test_a_flood_of_live_submits_leaves_one_running_one_waiting_and_the_service_serving():
    with Running(Service(SlowEngine(step_s=0.05), "tcp://127.0.0.1:*")) as running:
        service = running.service
        with Peer(running.endpoint) as artist:
            most = 0
            for i in range(200):
                send_live(artist, f"live{i}", replaces=f"live{i - 1}" if i else None)
                if i % 20 == 0:
                    time.sleep(0.05)
                    most = max(most, len(service.queue))
            events = until(artist, final("live199"), timeout=60)
            send_normal(artist, "after")
            after = until(artist, final("after"), timeout=30)
    ends = {e.job: e for e in events if e.type in ("result", "error", "cancelled")}
    assert len(ends) == 200 and ends["live199"].type == "result", len(ends)
    assert all(e.type == "cancelled" and e["reason"] == "superseded" for j, e in ends.items() if j != "live199")
    assert not [e for e in events if e.type == "error"]  # no limit was hit: superseded jobs free their budget
    assert most <= 2 and after[-1].type == "result"


def test_a_live_job_gives_the_pixels_of_the_same_normal_job(demo_models, krita_sdxl_cache):
    """The live job IS a normal job: same fields, same seed, same pixels (the real demo pipeline)."""
    from krita_sdxl.backend.engine.sdxl_engine import Engine

    engine = Engine.load(model=None, demo=True, device="cpu", cache_dir=krita_sdxl_cache)
    image = rgba(96, 64, seed=3)
    fields = {"prompt": "a lighthouse", "strength": 0.3, "steps": capped_steps(30, 0.3, 6), "seed": 77}
    fields.update(work_width=96, work_height=64)
    with Running(Service(engine, "tcp://127.0.0.1:*")) as running, Peer(running.endpoint) as peer:
        send_job(peer, "live", image, live=True, **fields)
        live = until(peer, final("live"), timeout=120)[-1]
        send_job(peer, "normal", image, **fields)
        normal = until(peer, final("normal"), timeout=120)[-1]
    assert live.type == normal.type == "result"
    assert bytes(live.images["image"].data) == bytes(normal.images["image"].data)
    assert bytes(live.images["image"].data) != bytes(image.data)


# -- the cap on UNet calls -------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 7, 30, 50, 500])
@pytest.mark.parametrize("strength", [0.01, 0.1, 0.25, 0.3, 0.33, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("cap", [1, 6, 8, 20])
def test_the_cap_keeps_the_strength_and_runs_at_most_cap_calls(steps, strength, cap):
    n = capped_steps(steps, strength, cap)
    calls = denoise_steps(n, strength)
    if denoise_steps(steps, strength) <= cap:
        assert n == steps  # under the cap: the artist's own steps
    else:
        assert calls == cap and n <= steps
        assert n == 1 or denoise_steps(n - 1, strength) < cap  # the fewest steps: the schedule starts
        assert abs(calls / n - strength) <= 1 / n  # at the noise level the strength asks for


# -- the pool's dispatcher -------------------------------------------------------------------------


class FakeStream:
    """A streaming DeploymentHandle response: progress every 20 ms until ``cancel()``."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.steps = 0

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self):
        from ray.serve.exceptions import RequestCancelledError

        yield ("started", {"replica": "r1", "node": "n", "pid": 1})
        while not self.cancelled.wait(0.02):
            self.steps += 1
            yield ("progress", self.steps, 1000, None)
        raise RequestCancelledError("cancelled")


class FakeHandle:
    def __init__(self) -> None:
        self.streams: list[FakeStream] = []

    def options(self, **_kw: Any) -> FakeHandle:
        return self

    def remote(self, _shipped: Any) -> FakeStream:
        self.streams.append(FakeStream())
        return self.streams[-1]


def test_the_pool_cancels_a_superseded_jobs_call_on_its_replica(monkeypatch, ctx):
    pytest.importorskip("ray")
    import zmq

    from krita_sdxl.backend.pool import dispatcher, transfer
    from krita_sdxl.backend.pool.capabilities import ReplicaBook
    from krita_sdxl.backend.pool.plan import PoolPlan

    monkeypatch.setattr(transfer, "ship", lambda *_a, **_k: {})  # no object store here: the rule, not Ray
    monkeypatch.setattr(dispatcher, "routing_key", lambda payload: "")
    pull = ctx.socket(zmq.PULL)
    endpoint = "inproc://live-lane-pool"
    pull.bind(endpoint)
    q, handle = JobQueue(), FakeHandle()
    pool = dispatcher.Dispatcher(ctx, endpoint, q, handle=handle, book=ReplicaBook(PoolPlan(1, 1, 0)), slots=1)
    pool.start()
    try:
        q.submit(job(A, "live1", live=True))
        deadline = time.monotonic() + 5
        while not (handle.streams and handle.streams[0].steps >= 2):
            assert time.monotonic() < deadline, "the slot never ran the job"
            time.sleep(0.01)
        q.supersede(A, live=True, replaces=None)
        assert handle.streams[0].cancelled.wait(2), "the watcher did not cancel the call on the replica"
        events = []
        while not any(b"cancelled" in f for f in events):
            assert pull.poll(5000), f"no cancelled event; got {events}"
            events.append(b"".join(pull.recv_multipart()))
        assert b"superseded" in events[-1]
    finally:
        q.close()
        pool.join(5)
        pull.close(linger=0)
