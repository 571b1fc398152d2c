"""Clients of a pool service for its tests: live (a heartbeat a second, whatever arrives), job by job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from attack import Peer, header, rgba

from krita_sdxl.backend.pool.reaper import descendants, start_time
from krita_sdxl.protocol import Message

FINAL = ("result", "error", "cancelled")
QUICK = {"prompt": "a castle on a hill", "steps": 4, "strength": 0.5}  # 2 denoising steps on the demo model
LONG = {"prompt": "x", "steps": 500, "strength": 1.0}


def events(peer: Peer, until: Any, timeout: float = 60.0) -> list[Message]:
    """Events (heartbeat replies left out) until ``until(event)``; AssertionError after ``timeout``."""
    out: list[Message] = []
    deadline, beat = time.monotonic() + timeout, 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= beat:
            peer.send([header("heartbeat")])
            beat = time.monotonic() + 1.0
        event = peer.recv(0.2)
        if event is None or event.type == "heartbeat":
            continue
        out.append(event)
        if until(event):
            return out
    raise AssertionError(f"timed out after {timeout} s; events: {[(e.type, e.job) for e in out]}")


def final_of(peer: Peer, job: str, timeout: float = 60.0) -> Message:
    return events(peer, lambda e: e.job == job and e.type in FINAL, timeout)[-1]


def run_job(endpoint: str, job: str = "j", seed: int = 1, timeout: float = 90.0, **fields: Any) -> Message:
    with Peer(endpoint) as peer:
        peer.send_job(job, rgba(48, 40, seed), seed=seed, **(fields or QUICK))
        return final_of(peer, job, timeout)


def welcome(peer: Peer) -> dict[str, Any]:
    peer.send([header("hello", client="pool test")])
    return events(peer, lambda e: e.type == "welcome", 30)[-1]["capabilities"]


def replica_ids(endpoint: str) -> set[str]:
    with Peer(endpoint) as peer:
        return {r["replica"] for r in welcome(peer)["pool"]["replica_states"]}


def pool_name(log: str) -> str:
    m = re.search(r"pool (\S+): deploying", log)
    assert m, log[-2000:]
    return m.group(1)


def tree(pid: int) -> dict[int, str]:
    """The processes below ``pid`` now: {pid: start time}."""
    return {p: s for p in descendants(pid) if (s := start_time(p)) is not None}


def names(pids: dict[int, str]) -> set[str]:
    out = set()
    for pid in pids:
        try:
            out.add(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            pass
    return out


def gone_within(pids: dict[int, str], seconds: float) -> tuple[float, list[str]]:
    """Wait until none of ``pids`` runs (a zombie counts as gone); (seconds waited, the names still running)."""
    t = time.monotonic()
    while True:
        alive = {p: s for p, s in pids.items() if start_time(p) == s and not _zombie(p)}
        if not alive or time.monotonic() - t > seconds:
            return time.monotonic() - t, sorted(names(alive))
        time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_all(pids: dict[int, str]) -> None:
    for pid, started in pids.items():
        if start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def listening(pids: set[int]) -> list[str]:
    """The TCP and UDP addresses the processes ``pids`` listen on (ss)."""
    out = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        if {int(x) for x in re.findall(r"pid=(\d+),", line)} & pids:
            found.append(line.split()[4])  # Netid State Recv-Q Send-Q Local-Address:Port ...
    return found


def loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or host.startswith("127.")
