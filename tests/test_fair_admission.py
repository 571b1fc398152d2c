"""Issue 20, item 5: idle or numerous peers locked everyone out. In-process services, real sockets.

- Five routing ids that submitted and never read their results held the whole byte budget: every new
  client got ``limit`` for as long as they stayed.
- Clients holding one job each took the whole job budget: a well-behaved client got ``limit``.
Now a new client gets its first job in at once, or within the time it takes a result to count as
unread; a client whose results wait unread gets no new job; an unread result expires."""

from __future__ import annotations

import time

from attack import Peer, Running, SlowEngine, header, limits, rgba

from krita_sdxl.backend.service.server import Service

MiB = 1024 * 1024
LAYER = 1024 * 1024 * 4  # rgba(1024, 1024): 4 MiB


def beat(peers: list[Peer]) -> None:
    """Alive: they answer heartbeats, they just do not read (silent for the timeout, they would vanish)."""
    for peer in peers:
        peer.send([header("heartbeat")])


def test_idle_peers_holding_unread_results_keep_a_new_client_out_for_a_bounded_wait():
    stall = 3.0  # a result unread that long counts as unread (the service's heartbeat timeout)
    budget = limits(max_client_bytes=LAYER + MiB, max_total_bytes=5 * LAYER, max_jobs_per_client=4)
    service = Service(SlowEngine(), "tcp://127.0.0.1:*", limits=budget, heartbeat_timeout=60)
    service.downloads.stall = stall  # the peers stay alive however slow this machine is; results go stale
    with Running(service) as running:
        idle = [Peer(running.endpoint, rcvhwm=1) for _ in range(5)]  # tiny receive buffers: nothing drains
        try:
            for i, peer in enumerate(idle):
                peer.hold_results = True  # they submit and never read
                got = peer.submit(f"i{i}", image=rgba(1024, 1024, seed=i))
                assert got[-1].type == "accepted", (i, [(e.type, e.fields) for e in got])
                beat(idle[:i])
            deadline = time.monotonic() + 20
            while service.queue.total_bytes < 5 * LAYER and time.monotonic() < deadline:
                beat(idle)
                time.sleep(0.05)
            assert service.queue.total_bytes == 5 * LAYER  # the whole budget: five unread results
            with Peer(running.endpoint) as artist:
                first = time.monotonic()
                refusals = 0
                while True:
                    beat(idle)
                    answer = artist.submit(f"mine{refusals}", image=rgba(1024, 1024, seed=9), timeout=5)[-1]
                    if answer.type == "accepted":
                        break
                    assert (answer.type, answer["code"]) == ("error", "limit"), answer.fields
                    refusals += 1
                    assert time.monotonic() - first < stall + 3, f"still refused after {refusals} tries"
                    time.sleep(0.2)
                wait = time.monotonic() - first
                print(f"\nthe well-behaved client waited {wait:.2f} s ({refusals} refusals) for its job to get in")
            assert wait < stall + 3
            told = []  # the dropped results' owners hear of it (behind the chunks in their tiny buffers)
            deadline = time.monotonic() + 20
            while not told and time.monotonic() < deadline:
                beat(idle)
                told = [e for peer in idle for e in peer.drain(0.2) if e.type == "error"]
            assert told and all(e["code"] == "limit" and "to make room" in e["message"] for e in told), told
        finally:
            for peer in idle:
                peer.close()


def test_a_client_whose_results_wait_unread_gets_no_new_job():
    service = Service(SlowEngine(), "tcp://127.0.0.1:*", heartbeat_timeout=60)
    service.downloads.stall = 1.0  # unread for 1 s: unread (the client stays alive however slow the machine)
    with Running(service) as running, Peer(running.endpoint) as lazy:
        lazy.hold_results = True
        assert lazy.submit("first", image=rgba(64, 64))[-1].type == "accepted"
        for _ in range(8):  # its result is there, unread for longer than the heartbeat timeout; alive
            lazy.send([header("heartbeat")])
            time.sleep(0.2)
        refused = lazy.submit("second", image=rgba(8, 8))[-1]
        assert (refused.type, refused["code"]) == ("error", "limit"), refused.fields
        assert "has not been read" in refused["message"] and "'first'" in refused["message"]
        assert [e.job for e in lazy.read_held() if e.type == "result"] == ["first"]
        assert lazy.submit("third", image=rgba(8, 8))[-1].type == "accepted"  # read: in again


def test_clients_holding_one_job_each_leave_room_for_a_new_clients_first_job():
    engine = SlowEngine(gate=True)
    service = Service(engine, "tcp://127.0.0.1:*", limits=limits(max_jobs_total=30))
    with Running(service) as running:
        crowd = [Peer(running.endpoint) for _ in range(40)]
        try:
            answers = [peer.submit(f"c{i}")[-1].type for i, peer in enumerate(crowd)]
            assert answers == ["accepted"] * 40  # each holds one job: all 40 are first jobs
            with Peer(running.endpoint) as artist:
                started = time.monotonic()
                assert artist.submit("mine")[-1].type == "accepted"
                assert time.monotonic() - started < 2
        finally:
            engine.gate.set()
            for peer in crowd:
                peer.close()


def test_an_unread_result_expires_and_its_owner_is_told():
    service = Service(SlowEngine(), "tcp://127.0.0.1:*", limits=limits(result_ttl=1.0), heartbeat_timeout=30)
    with Running(service) as running, Peer(running.endpoint) as lazy:
        lazy.hold_results = True
        assert lazy.submit("old", image=rgba(256, 256))[-1].type == "accepted"
        time.sleep(2.0)
        assert service.queue.bytes_of(lazy.routing_id) == 0  # its memory is free
        events = lazy.read_held() + lazy.drain()
        expired = [e for e in events if e.type == "error"]
        assert expired and expired[0].job == "old" and expired[0]["code"] == "limit", [e.fields for e in events]
        assert "not read within 1 s" in expired[0]["message"]
