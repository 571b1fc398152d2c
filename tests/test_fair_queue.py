"""Issue 11, memory and fairness: round robin between clients, job and byte budgets, undelivered
results. The queue's rules alone (fast), then through real services over real sockets."""

from __future__ import annotations

import time

import pytest
from attack import Peer, Running, SlowEngine, final, rgba

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.backend.service.jobs import Job, JobQueue, Owner, QueueFull
from krita_sdxl.backend.service.limits import Limits
from krita_sdxl.backend.service.server import Service

A, B, C = Owner(b"a" * 16), Owner(b"b" * 16), Owner(b"c" * 16)


def job(owner: Owner, name: str, nbytes: int = 0) -> Job:
    return Job(owner, name, None, nbytes=nbytes)


def names(jobs) -> list[str]:
    return [j.id for j in jobs]


def test_round_robin_between_clients_each_in_its_own_order():
    q = JobQueue()
    for i in range(5):
        q.submit(job(A, f"a{i}"))
    q.submit(job(B, "b0"))
    q.submit(job(B, "b1"))
    q.submit(job(C, "c0"))
    taken = []
    while len(q):
        j = q.take(timeout=0)
        taken.append(j.id)
        q.done(j)
    assert taken == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]


def test_positions_count_the_jobs_that_run_before():
    q = JobQueue()
    positions = {}
    for name, owner in [("a0", A), ("a1", A), ("a2", A), ("b0", B)]:
        q.submit(job(owner, name), lambda p, n=name: positions.__setitem__(n, p))
    assert positions == {"a0": 0, "a1": 1, "a2": 2, "b0": 1}  # b0 runs right after a0, not after a2
    running = q.take(timeout=0)
    assert running.id == "a0"
    _, waiting = q.snapshot()
    assert [(p, j.id) for p, j in waiting] == [(1, "b0"), (2, "a1"), (3, "a2")]
    assert [(p, j.id) for p, j in q.snapshot(B)[1]] == [(1, "b0")]
    second = q.take(timeout=0)  # several jobs may run at once (a pool of GPUs)
    assert names(q.running) == ["a0", "b0"] and second.id == "b0"
    assert [(p, j.id) for p, j in q.snapshot()[1]] == [(2, "a1"), (3, "a2")]


def test_per_client_job_and_byte_budgets():
    q = JobQueue(max_per_client=3, max_client_bytes=1000)
    q.submit(job(A, "a0", 400))
    q.submit(job(A, "a1", 400))
    with pytest.raises(QueueFull, match=r"limit is 0\.0 MiB per client"):
        q.submit(job(A, "a2", 400))
    q.submit(job(B, "b0", 1000))  # another client has its own budget
    q.submit(job(A, "small", 100))
    with pytest.raises(QueueFull, match="already has 3 jobs"):
        q.submit(job(A, "a3", 0))


def test_undelivered_results_count_against_their_client():
    q = JobQueue(max_client_bytes=1000, max_total_bytes=10_000)
    q.hold(A.account, 900)  # a result ZeroMQ has not taken yet
    with pytest.raises(QueueFull, match="undelivered results"):
        q.submit(job(A, "a0", 200))
    assert q.bytes_of(A.account) == 900
    q.release(A.account, 900)
    q.submit(job(A, "a0", 200))
    assert q.bytes_of(A.account) == 200 and q.total_bytes == 200


def test_a_finished_jobs_result_counts_from_the_moment_its_job_ends():
    """The job's bytes and its result's are one hand-over: between the worker's end of a job and the I/O
    thread's taking its result, a submit found the budget free (CI: a client got in over a full budget)."""
    q = JobQueue(max_total_bytes=1000)
    q.submit(job(A, "a0", 800))
    running = q.take(timeout=0)
    q.done(running, result_bytes=900)  # an upscale's result may be bigger than its job
    assert q.total_bytes == 900 and q.bytes_of(A.account) == 900
    with pytest.raises(QueueFull, match="in all"):
        q.submit(job(B, "b0", 200))
    q.release(A.account, 900)  # delivered
    q.submit(job(B, "b0", 200))


def test_a_full_queue_drops_the_biggest_holders_newest_job():
    q = JobQueue(max_total=4)
    for i in range(4):
        q.submit(job(A, f"a{i}"))
    dropped = q.submit(job(B, "b0"))  # B holds nothing: A's newest queued job makes room
    assert names(dropped) == ["a3"]
    with pytest.raises(QueueFull, match="limit is 4"):
        q.submit(job(A, "a4"))  # A is the biggest holder itself: refused, nothing dropped
    assert names(j for _, j in q.snapshot()[1]) == ["a0", "b0", "a1", "a2"]
    q2 = JobQueue(max_total=100, max_total_bytes=1000)
    q2.submit(job(A, "big", 900))
    assert names(q2.submit(job(B, "b0", 500))) == ["big"]  # bytes: the same rule
    with pytest.raises(QueueFull, match="in all"):
        q2.submit(job(B, "b1", 600))  # B is now the biggest holder


def test_nothing_is_queued_or_dropped_when_the_announcement_fails():
    q = JobQueue(max_total=2)
    q.submit(job(A, "a0"))
    q.submit(job(A, "a1"))

    def fail(position: int) -> None:
        raise OverflowError("cannot encode")

    with pytest.raises(OverflowError):
        q.submit(job(B, "b0"), fail)
    assert names(j for _, j in q.snapshot()[1]) == ["a0", "a1"] and len(q) == 2
    assert not q.has((B, "b0"))


def test_cancel_where_and_close():
    q = JobQueue()
    q.submit(job(A, "a0"))
    q.submit(job(A, "a1"))
    q.submit(job(B, "b0"))
    running = q.take(timeout=0)
    removed = q.cancel_where(lambda o: o == A, "client_lost")
    assert names(removed) == ["a1"] and running.cancel.is_set() and running.cancel_reason == "client_lost"
    assert names(q.close()) == ["b0"] and q.take(timeout=0) is None


# -- through real services --------------------------------------------------------------------


def test_one_clients_burst_does_not_starve_another(tmp_path):
    """The attack: one process fills the queue; a well-behaved client's job runs after one turn."""
    # The hog is a raw socket that sends no heartbeats while the artist waits: a long timeout keeps a slow
    # machine from declaring it gone (and cancelling its jobs) before the order can be checked.
    svc = start_service(
        ["--demo", "--cache-dir", str(tmp_path / "cache"), "--log-level", "warning", "--heartbeat-timeout", "600"]
    )
    try:
        with Peer(svc.endpoint) as hog, ServiceClient(svc.endpoint, timeout=60) as artist:
            hog_accepted = [
                hog.submit(f"h{i}", image=rgba(64, 64), steps=4, strength=1.0, seed=i, timeout=30)[-1]
                for i in range(10)
            ]
            assert [e.type for e in hog_accepted] == ["accepted"] * 10
            job = artist.submit(rgba(64, 64), steps=4, strength=1.0, seed=1)
            mine = [e for e in artist.events(job, timeout=60) if e.type != "credit"]
            assert mine[0].type == "accepted" and mine[0]["position"] <= 2, mine[0].fields
            assert mine[-1].type == "result"
            hog_done = [e.job for e in hog.events_until(final("h9"), timeout=60) if e.type == "result"]
        assert len(hog_done) >= 6  # most of the hog's jobs were still to run when the artist's finished
        assert hog_done == sorted(hog_done, key=lambda j: int(j[1:]))  # and they kept their order
    finally:
        assert svc.stop() == 0, svc.log


@pytest.fixture
def gated():
    engine = SlowEngine(gate=True)
    limits = Limits(max_jobs_total=4, max_client_bytes=600 * 1024)
    with Running(Service(engine, "tcp://127.0.0.1:*", limits=limits)) as running:
        yield running, engine
        engine.gate.set()


def test_byte_budget_per_client_over_sockets(gated):
    running, _engine = gated
    with Peer(running.endpoint) as peer:
        replies = [peer.submit(f"j{i}", image=rgba(256, 256))[-1] for i in range(3)]  # 256 KiB each
        assert [r.type for r in replies] == ["accepted", "accepted", "error"]
        assert replies[2]["code"] == "limit" and "per client" in replies[2]["message"]
        assert replies[2].job == "j2"


def test_a_new_client_gets_in_when_the_queue_is_full(gated):
    running, engine = gated
    with Peer(running.endpoint) as hog, Peer(running.endpoint) as artist:
        # the total is 4 jobs beyond each client's first: the hog gets 5, then the total is full for it
        assert [hog.submit(f"h{i}")[-1].type for i in range(6)] == ["accepted"] * 5 + ["error"]
        assert artist.submit("mine")[-1].type == "accepted"  # a first job always gets in
        assert hog.recv(timeout=0.5) is None  # and takes nothing from anyone
        assert artist.submit("mine2")[-1].type == "accepted"  # a second one: the biggest holder makes room
        dropped = hog.recv()
        assert (dropped.type, dropped["code"], dropped.job) == ("error", "limit", "h4")
        assert "make room for another client" in dropped["message"]
        assert hog.recv(timeout=0.5) is None  # one job for one
        refused = hog.submit("h5")[-1]
        assert (refused.type, refused["code"]) == ("error", "limit")
        engine.gate.set()
        assert artist.events_until(final("mine2"))[-1].type == "result"
        assert [e.job for e in hog.events_until(final("h3")) if e.type == "result"] == ["h0", "h1", "h2", "h3"]


def test_results_a_client_does_not_read_count_against_it():
    """A client that submits and never reads: its results wait at the service; once they fill its
    budget it gets ``limit`` until it reads them."""
    limits = Limits(max_client_bytes=12 * 1024 * 1024)
    with Running(Service(SlowEngine(), "tcp://127.0.0.1:*", limits=limits)) as running:
        queue = running.service.queue
        with Peer(running.endpoint) as slow:
            slow.hold_results = True
            for i in range(3):
                assert slow.submit(f"r{i}", image=rgba(1024, 1024, seed=i))[-1].type == "accepted"  # 4 MiB each
            deadline = time.monotonic() + 10
            while running.service.downloads.pending_bytes < 12 * 1024 * 1024 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert queue.bytes_of(slow.routing_id) == 12 * 1024 * 1024  # unread results count
            refused = slow.submit("r3", image=rgba(1024, 1024, seed=3))[-1]
            assert (refused.type, refused["code"]) == ("error", "limit")
            assert "undelivered results" in refused["message"]
            results = slow.read_held()
            assert sorted(e.job for e in results) == ["r0", "r1", "r2"]
            assert all(
                bytes(e.images["image"].data) == bytes(rgba(1024, 1024, seed=int(e.job[1:])).data) for e in results
            )
            time.sleep(0.5)
            assert queue.bytes_of(slow.routing_id) == 0  # read: released
            assert slow.submit("after")[-1].type == "accepted"
