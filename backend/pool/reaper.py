"""The clean-up of a service that dies without closing its pool (``kill -9``, the OOM killer, a crash).

Ray's gcs_server and raylet die with the process that started them, and the replicas with the raylet, but
Ray's dashboard and runtime-env agents poll for their raylet and then try to report to the dead head: they
lingered 20 to 95 s (about 210 MB) after a killed service. The service's shared-memory pixel buffers
(backend/pool/shm.py) would stay in /dev/shm.

``Reaper`` starts ``python -m krita_sdxl.backend.pool.reaper`` (its own session: a Ctrl-C to the service's
terminal does not reach it), tells it over a pipe which processes and files are the service's, and says
``done`` when it has closed the pool itself. When the pipe ends without ``done``, the service is dead: the
reaper kills those processes (and theirs) and removes the files, then exits. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

FOLLOW_S = 0.25  # how often the service tells the reaper about its new processes


def start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), which tells it apart from a later process that
    reuses its id; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[19]


def alive(pid: int, started: str) -> bool:
    """The process registered with ``started`` still runs (not gone, not reused, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] == started and fields[0] != "Z"


def children(pid: int) -> list[int]:
    """The process's children (every thread's), from /proc."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


class Reaper:
    """The service's side: start the reaper, tell it what to clean, say ``done`` after a clean close."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._told: set[str] = set()
        self._procs: dict[int, str] = {}
        self._files: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if not Path("/proc/self/stat").exists():
            return  # not Linux: nothing to watch with
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "krita_sdxl.backend.pool.reaper"],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def _say(self, line: str) -> None:
        with self._lock:
            if self._proc is None or self._proc.stdin is None or line in self._told:
                return
            self._told.add(line)
            with contextlib.suppress(OSError):
                self._proc.stdin.write(line.encode() + b"\n")
                self._proc.stdin.flush()

    def follow(self) -> None:
        """From now until ``done``: every process this one starts (a local Ray's gcs_server, raylet and the
        agents below it), told as it appears, even while ``ray.init`` is still starting them."""
        if self._proc is None:
            return
        me, reaper = os.getpid(), self._proc.pid

        def loop() -> None:
            while not self._stop.wait(FOLLOW_S):
                for p in descendants(me):
                    if p != reaper and (started := start_time(p)) is not None:
                        self._procs[p] = started
                        self._say(f"proc {p} {started}")

        threading.Thread(target=loop, name="krita-sdxl-reaper-follow", daemon=True).start()

    def watch_file(self, path: str) -> None:
        self._files.add(path)
        self._say(f"file {path}")

    def done(self, settle: float = 5.0) -> None:
        """The pool is closed (or never started): what it left is stopped here (Ray's agents may outlive a
        ``ray.shutdown`` that ran while ``ray.init`` was still starting them), and the reaper goes."""
        self._stop.set()
        deadline = time.monotonic() + settle
        while any(alive(p, s) for p, s in self._procs.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
        _kill(self._procs)
        for path in self._files:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self._proc is None:
            return
        self._say("done")
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        self._proc = None


def _kill(procs: dict[int, str]) -> int:
    """SIGKILL each process that is still the one registered (same start time), and its descendants."""
    left = {p for p, started in procs.items() if alive(p, started)}
    for p in list(left):
        left.update(descendants(p))
    for p in left:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    return len(left)


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the end of the pipe ends this process
    procs: dict[int, str] = {}
    files: set[str] = set()
    for raw in sys.stdin.buffer:
        line = raw.decode(errors="replace").strip()
        if line == "done":
            return 0
        kind, _, rest = line.partition(" ")
        if kind == "proc":
            pid, _, started = rest.partition(" ")
            with contextlib.suppress(ValueError):
                procs[int(pid)] = started
        elif kind == "file":
            files.add(rest)
    time.sleep(0.2)  # the dead service's own children (gcs_server, raylet) are being killed by the kernel
    killed = _kill(procs)
    for path in files:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if killed or files:
        print(f"krita-sdxl: the service ended without stopping its pool: stopped {killed} Ray process(es) it "
              f"left and removed {len(files)} shared-memory file(s)", file=sys.stderr, flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
