"""Start and stop ``krita-sdxl serve`` in a subprocess: for ``krita-sdxl demo``, tests and benchmarks."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

READY = re.compile(r"ready on (\S+)")


@dataclass
class ServiceProcess:
    proc: subprocess.Popen
    endpoint: str
    lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _pump(stream, lines: list[str], q: queue.Queue) -> None:
    for line in stream:
        lines.append(line)
        q.put(line)
    q.put(None)


def start_service(args: Sequence[str], timeout: float = 120.0, env: dict[str, str] | None = None) -> ServiceProcess:
    """Run ``python -m krita_sdxl.backend.cli serve ARGS`` and wait for its ready line."""
    cmd = [sys.executable, "-m", "krita_sdxl.backend.cli", "serve", "--endpoint", "tcp://127.0.0.1:*", *args]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    lines: list[str] = []
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines, q), daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = q.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            proc.kill()
            raise TimeoutError("service not ready in time:\n" + "".join(lines)) from None
        if line is None:
            proc.wait()
            raise RuntimeError(f"service exited with {proc.returncode}:\n" + "".join(lines))
        m = READY.search(line)
        if m:
            return ServiceProcess(proc, m.group(1), lines)
