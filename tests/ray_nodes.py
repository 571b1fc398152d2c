"""A real Ray cluster of several nodes on this machine, as `ray start` makes one, on loopback only.

Each node has its own temp folder and its own ports (free ones, picked here: Ray's fixed defaults, such as
52365 for the dashboard agent and 10001 for the client server, would collide with another node or with
another Ray on this machine). Token authentication is on, with the token in a private HOME.

Ray takes 127.0.0.1 as a node's address only when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (else it swaps
in the host's outward address and listens there), and with that variable `ray start --address` refuses
to start a second node; so worker nodes run the same `ray start` with Ray's address lookup pointed at
loopback. A node is stopped by its processes' ids (never `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from krita_sdxl.backend.pool.reaper import descendants, start_time

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
OBJECT_STORE = 128 * 2**20  # bytes per node: jobs here are small
WORKER_START = (
    "import sys, ray._private.services as services\n"
    "services.get_node_ip_address = lambda address=None: '127.0.0.1'\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "sys.exit(main())\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ports() -> list[str]:
    """Every port a node opens, picked free (worker ports: a range of 20)."""
    low = free_port()
    while not all(_free(p) for p in range(low, low + 20)):
        low = free_port()
    return [
        "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--min-worker-port", str(low),
        "--max-worker-port", str(low + 19),
    ]  # fmt: skip


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Node:
    temp_dir: Path
    pids: list[tuple[int, str]] = field(default_factory=list)  # (pid, start time) of its processes

    def find(self, name: str) -> int:
        """The pid of this node's process ``name`` (gcs_server, raylet)."""
        for pid, _ in self.pids:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    return pid
        raise LookupError(name)

    def refresh(self) -> None:
        """Also the processes started below this node's since (workers, agents)."""
        known = {p for p, _ in self.pids}
        for pid, _ in list(self.pids):
            for child in descendants(pid):
                if child not in known and (started := start_time(child)) is not None:
                    self.pids.append((child, started))
                    known.add(child)

    def stop(self) -> None:
        self.refresh()
        for pid, started in self.pids:
            if start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


class Cluster:
    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        self.env = dict(os.environ, HOME=str(home), RAY_AUTH_MODE="token", RAY_gcs_server_port_wait_time_s="120",
                        **LOOPBACK_ENV)  # fmt: skip
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []

    def _start(self, args: list[str], temp_dir: Path, env: dict[str, str], worker: bool) -> Node:
        before = set(_ray_pids())
        cmd = [sys.executable, "-c", WORKER_START] if worker else [str(Path(sys.executable).parent / "ray")]
        proc = subprocess.run([*cmd, "start", *args, "--temp-dir", str(temp_dir), "--disable-usage-stats",
                               "--object-store-memory", str(OBJECT_STORE), *ports()],
                              env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
        node = Node(temp_dir)
        for pid in set(_ray_pids()) - before:
            if (started := start_time(pid)) is not None and _in(pid, temp_dir):
                node.pids.append((pid, started))
        node.refresh()
        self.nodes.append(node)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return node

    def start_head(self, num_cpus: int = 0) -> Node:
        args = ["--head", "--port", str(self.port), "--num-cpus", str(num_cpus), "--include-dashboard", "false",
                "--ray-client-server-port", str(free_port())]  # fmt: skip
        return self._start(args, self.root / "head", self.env, worker=False)

    def add_node(self, num_cpus: int = 2, num_gpus: int = 0) -> Node:
        env = {k: v for k, v in self.env.items() if k not in LOOPBACK_ENV}
        args = ["--address", self.address, "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus)]
        return self._start(args, self.root / f"node{len(self.nodes)}", env, worker=True)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        time.sleep(0.5)


def _ray_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "gcs_server|raylet|ray/_private|ray/dashboard|ray/autoscaler"],
                         capture_output=True, text=True).stdout  # fmt: skip
    return [int(p) for p in out.split()]


def _in(pid: int, temp_dir: Path) -> bool:
    """Whether a Ray process belongs to the node with ``temp_dir`` (its command line names the folder)."""
    try:
        return str(temp_dir) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
