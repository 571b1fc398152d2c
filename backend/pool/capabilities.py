"""What ``welcome`` says about the pool, and the engine stand-in the service reads it from. Pure: no Ray.

The book merges two views of each replica: Ray Serve's (state, host, process), refreshed every few
seconds, and the dispatcher's own, from the events replicas stream (the job it runs, jobs done,
models resident). ``welcome.capabilities.pool`` (protocol/README.md):

    kind "ray"; replicas (running now); min_replicas, max_replicas; autoscaling; gpus_per_replica;
    gpus (held by running replicas); replica_states: list of {replica, state, node, pid, device, gpu,
    models, jobs, cancelled, failed, stopped_at}, state one of idle, busy, starting, stopping, lost, ...
    The counts and models are as of the replica's last event (its last job's start or end); before its
    first job, a replica has the models every replica loads at its start, and gpu null.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .plan import PoolPlan

if TYPE_CHECKING:
    from krita_sdxl.backend.engine.stages import TimestepsFn

PUBLIC = ("replica", "state", "node", "pid", "device", "gpu", "models", "jobs", "cancelled", "failed", "stopped_at")


class ReplicaBook:
    def __init__(self, plan: PoolPlan, models: list[str] | None = None) -> None:
        """``models``: what every replica loads at its start (the refiner)."""
        self.plan = plan
        self._lock = threading.Lock()
        self._replicas: dict[str, dict[str, Any]] = {}
        # what a replica that has not streamed an event yet is known to be (gpu: its name comes with it)
        self._new = {"device": "cuda" if plan.gpus else "cpu", "models": list(models or []), "jobs": 0,
                     "cancelled": 0, "failed": 0}  # fmt: skip
        self._deployment: dict[str, Any] = {}

    def refresh(self, serve_view: list[dict[str, Any]], deployment: dict[str, Any] | None = None) -> None:
        """Ray Serve's replicas now: [{replica, state (RUNNING, STARTING, ...), node, pid}], and the
        deployment's {status, message}. A replica it no longer lists is gone (stopped, or replaced after a
        crash)."""
        with self._lock:
            if deployment is not None:
                self._deployment = dict(deployment)
            seen = set()
            for row in serve_view:
                rid = row["replica"]
                seen.add(rid)
                record = self._replicas.setdefault(rid, {**self._new, "replica": rid, "busy": None})
                if record.get("serve_state") != "LOST":
                    record.update(row, serve_state=str(row.get("state", "")).upper())
            for rid in set(self._replicas) - seen:
                del self._replicas[rid]

    def started(self, state: dict[str, Any], job: str) -> None:
        """A replica's ``started`` event: it runs ``job`` now."""
        self._update(state, busy=job)

    def finished(self, state: dict[str, Any]) -> None:
        self._update(state, busy=None)

    def idle(self, replica: str) -> None:
        with self._lock:
            if replica in self._replicas:
                self._replicas[replica]["busy"] = None

    def lost(self, replica: str) -> None:
        """The replica died while running a job (Ray Serve replaces it)."""
        with self._lock:
            if replica in self._replicas:
                self._replicas[replica].update(busy=None, serve_state="LOST")

    def _update(self, state: dict[str, Any], busy: str | None) -> None:
        with self._lock:
            rid = state["replica"]
            record = self._replicas.setdefault(rid, {**self._new, "replica": rid, "serve_state": "RUNNING"})
            record.update({k: v for k, v in state.items() if k in PUBLIC and k != "state"}, busy=busy)

    def problems(self) -> list[str]:
        """What Ray Serve says about the deployment when it is not healthy (why replicas do not start)."""
        with self._lock:
            status, message = self._deployment.get("status"), self._deployment.get("message")
        return [str(message)] if message and status != "HEALTHY" else []

    def given_up(self) -> bool:
        """Ray Serve has stopped trying to start the replicas: their constructor failed again and again
        (not a replica that died and is being replaced, nor a lost host's replicas waiting for one)."""
        with self._lock:
            status, message = self._deployment.get("status"), str(self._deployment.get("message") or "")
        return status == "DEPLOY_FAILED" or (status == "UNHEALTHY" and "failed to start" in message)

    def running(self) -> list[str]:
        with self._lock:
            return [r for r, rec in self._replicas.items() if rec.get("serve_state") == "RUNNING"]

    def replica(self, rid: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._replicas.get(rid)
            return _public(record) if record is not None else None

    def capability(self) -> dict[str, Any]:
        with self._lock:
            states = [_public(self._replicas[r]) for r in sorted(self._replicas)]
        running = sum(1 for s in states if s["state"] in ("idle", "busy"))
        return {
            "kind": "ray",
            "replicas": running,
            "min_replicas": self.plan.replicas,
            "max_replicas": self.plan.max_replicas,
            "autoscaling": self.plan.autoscaling,
            "gpus_per_replica": self.plan.gpus,
            "gpus": running * self.plan.gpus,
            "replica_states": states,
        }


def _public(record: dict[str, Any]) -> dict[str, Any]:
    serve_state = record.get("serve_state", "")
    if serve_state == "RUNNING":
        state = "busy" if record.get("busy") else "idle"
    else:
        state = serve_state.lower() or "unknown"
    out = {k: record.get(k) for k in PUBLIC}
    out["state"] = state
    return out


class PoolEngine:
    """What the service reads from its engine, for a pool: the replicas' capabilities (from one of
    them), the pool's live state with every ``welcome``, and the step planning of its scheduler."""

    def __init__(self, described: dict[str, Any], book: ReplicaBook) -> None:
        self._caps = dict(described["capabilities"])
        for key in ("gpu_memory_free", "gpu_memory_total"):  # one replica's figures; the pool map has the rest
            self._caps.pop(key, None)
        self.book = book
        scheduler = described.get("scheduler")
        self.timesteps: TimestepsFn | None = None
        if scheduler is not None:
            from krita_sdxl.backend.engine.stages import scheduler_timesteps

            self.timesteps = scheduler_timesteps(scheduler)

    def describe(self) -> dict[str, Any]:
        return {**self._caps, "pool": self.book.capability()}

    def live_capabilities(self) -> dict[str, Any]:
        return {"pool": self.book.capability()}
