"""Start (or join) Ray, deploy the replicas, watch them, and tear them down: the pool as ``serve`` holds it.

- A local Ray (no ``--ray-address``) listens on loopback only: every port it opens (GCS, raylet, object
  manager, workers, the metrics and runtime-env agents) is bound to 127.0.0.1, so nothing of it is
  reachable from another host. Hosts that share a pool join a cluster an admin started (README).
- Joining checks the head first (backend/pool/reach.py) and is bounded (:data:`JOIN_TIMEOUT_S`).
- The replicas are the application ``pool_name`` (one per service; backend/pool/plan.py), held with a
  lease (backend/pool/lease.py); closing deletes that application only, and stops Ray only if this
  process started it.
- A local Ray's processes are told to the reaper as they start (backend/pool/reaper.py), which stops them
  if the service dies without closing the pool (killed, or aborted by Ray's own signal handler).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from krita_sdxl.backend.common.config import ConfigError, Settings

from . import failures, health, shm
from .bounded import RayTimeout, bounded
from .capabilities import PoolEngine, ReplicaBook
from .lease import RENEW_S, Lease
from .plan import PoolPlan, default_pool_name, plan_pool, shortfall
from .reaper import Reaper

log = logging.getLogger("krita_sdxl.pool")
DESCRIBE_TIMEOUT_S = 600.0  # a replica loads its models first (minutes for the real SDXL on a cold disk)
JOIN_TIMEOUT_S = 60.0  # ray.init to a cluster whose head answered the probe
CALL_TIMEOUT_S = 10.0  # one call to Serve's controller (its state)
DELETE_TIMEOUT_S = 30.0  # deleting the application: its replicas get graceful_shutdown_timeout_s (10 s)
SHUTDOWN_TIMEOUT_S = 20.0
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # 0: Ray takes 127.0.0.1 as the node's address
GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"


@dataclass
class Pool:
    handle: Any  # the deployment's DeploymentHandle
    plan: PoolPlan
    book: ReplicaBook
    engine: PoolEngine
    name: str  # the Ray Serve application
    started_ray: bool  # this process started Ray (and stops it); else it joined a cluster
    lease: Lease
    reaper: Reaper
    replica_timeout: float
    watchdog: health.Watchdog | None = field(default=None)

    @property
    def dispatcher(self) -> Any:
        """The service's ``worker`` factory: the pool's dispatcher (backend/pool/dispatcher.py)."""
        from .dispatcher import Dispatcher

        return functools.partial(
            Dispatcher,
            handle=self.handle,
            book=self.book,
            slots=self.plan.slots,
            serve_view=functools.partial(serve_view, self.name),
            replica_timeout=self.replica_timeout,
            shm_tag=f"{os.getpid()}" if shm.available() else None,
            on_file=self.reaper.watch_file,
        )

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Start the watchdog: ``on_lost(reason)`` once Ray is gone under the service."""

        node = _ray_worker().global_worker.node
        checks = [
            health.Check("raylet", health.raylet_check(node.raylet_socket_name), health.RAYLET_GRACE_S),
            health.Check("gcs", health.gcs_check(node.gcs_address, _token), health.GCS_GRACE_S, health.GCS_EVERY_S),
        ]
        gcs = _ray_worker().global_worker.gcs_client
        chores: list[tuple[float, Callable[[], None]]] = [(RENEW_S, lambda: self.lease.renew(gcs))]
        self.watchdog = health.Watchdog(checks, on_lost, chores)
        self.watchdog.start()

    def close(self) -> None:
        """Delete this pool's application (its replicas stop); stop Ray if this process started it. Every
        step is bounded: a Ray that is gone or frozen does not hold the service's exit."""
        import ray
        from ray import serve

        if self.watchdog is not None:
            self.watchdog.stop()
        lost = self.watchdog is not None and self.watchdog.lost is not None
        if lost:
            return  # Ray is gone: the reaper stops what is left of a local Ray when this process ends
        try:
            bounded("deleting the pool's replicas", DELETE_TIMEOUT_S, serve.delete, self.name)
            gcs = _ray_worker().global_worker.gcs_client
            bounded("releasing the pool's name", CALL_TIMEOUT_S, self.lease.release, gcs)
            if self.started_ray:
                bounded("stopping Ray Serve", SHUTDOWN_TIMEOUT_S, serve.shutdown)
        except Exception as exc:
            log.warning("could not stop the pool's replicas cleanly: %s", exc)
        if self.started_ray:
            try:
                bounded("stopping Ray", SHUTDOWN_TIMEOUT_S, ray.shutdown)
            except Exception as exc:
                log.warning("could not stop Ray cleanly: %s", exc)
        self.reaper.done()  # stops whatever of a local Ray is still running, removes the shared memory


def _ray_worker() -> Any:
    """Ray's driver state (private, pinned Ray 2.60): the node this process runs on, its GCS client."""
    from ray._private import worker

    return worker


def _token() -> object:
    from .reach import find_token, token_mode

    return find_token() if token_mode() else None


def serve_view(name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Ray Serve's replicas of the application: [{replica, state, node, pid}], and the deployment's
    {status, message} (the controller's details; bounded)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:  # Serve is not running in this process
        return [], {}
    details = bounded("reading the pool's state", CALL_TIMEOUT_S, client.get_serve_details)
    app = (details.get("applications") or {}).get(name) or {}
    rows, status = [], {}
    for deployment in (app.get("deployments") or {}).values():
        state = deployment.get("status")
        status = {"status": getattr(state, "value", state), "message": deployment.get("message") or ""}
        for r in deployment.get("replicas") or []:
            state = r.get("state")
            rows.append(
                {
                    "replica": r["replica_id"],
                    "state": getattr(state, "value", state),
                    "node": r.get("node_ip"),
                    "pid": r.get("pid"),
                }
            )
    return rows, status


def _quiet(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Serve's logging (for its controller, for the replicas): no access log line per request, and no
    controller tracebacks (a replica that cannot start fills the console with three) unless debugging: the
    service says what went wrong in one line; Ray's log folder keeps them (session_latest/logs/serve)."""
    debug = settings.log_level == "debug"
    if not debug:
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)
    replicas = {"log_level": "DEBUG" if debug else "WARNING", "enable_access_log": debug}
    return {**replicas, "log_level": "DEBUG" if debug else "CRITICAL"}, replicas


def _local_only() -> None:
    """A Ray started here binds every port to 127.0.0.1 (Ray's switch for a one-machine cluster): this
    process's Ray reads the constant, the processes it starts read the environment."""
    import ray._private.ray_constants as ray_constants

    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault(GCS_WAIT_ENV, "120")  # Ray's 30 s is too short for a busy machine's first start


def _join(address: str) -> None:
    """ray.init to a cluster: the head checked first, the join bounded."""
    import ray

    from .reach import check_head

    resolved = check_head(address)
    try:
        bounded("joining the Ray cluster", JOIN_TIMEOUT_S, ray.init, address=resolved,
                include_dashboard=False, logging_level=logging.WARNING)  # fmt: skip
    except RayTimeout:
        raise ConfigError(
            f"joining the Ray cluster at {resolved} did not finish within {JOIN_TIMEOUT_S:g} s: is this host a node "
            "of the cluster (`ray start --address` here), and is its raylet running?"
        ) from None
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"cannot join the Ray cluster at {resolved}: {first}") from None


def _deploy(settings: Settings, plan: PoolPlan, name: str, logging_config: dict[str, Any]) -> tuple[Any, Any]:
    """serve.run of this pool's application, and its first replica's description; ConfigError with the
    replicas' own reason when they cannot start."""
    from ray import serve

    from .replica import Replica

    # Replicas read the same cache folder (the demo model) even where KRITA_SDXL_CACHE is not set
    replica_settings = replace(settings, cache_dir=str(settings.cache_path))
    app = Replica.options(**plan.deployment_options()).bind(replica_settings, bool(plan.gpus))
    try:
        handle = bounded("deploying the pool's replicas", DESCRIBE_TIMEOUT_S, serve.run, app, name=name,
                         route_prefix=None, logging_config=logging_config)  # fmt: skip
        described = handle.options(method_name="describe").remote().result(timeout_s=DESCRIBE_TIMEOUT_S)
    except Exception as exc:
        try:
            _, status = serve_view(name)
            messages = [status.get("message", "")]
        except Exception:
            messages = []
        raise ConfigError(failures.start_failure(str(exc), messages)) from None
    return handle, described


def start_pool(settings: Settings) -> Pool:
    """Start a local Ray (or join ``settings.ray_address``), deploy the replicas and wait until one has
    loaded its models. ConfigError (one line) when Ray cannot be reached or the replicas cannot start."""
    import ray
    from ray import serve

    address = settings.ray_address or None
    name = settings.pool_name or default_pool_name(settings.endpoint, socket.gethostname(), os.getpid())
    reaper = Reaper()
    lease = Lease(name, settings.endpoint)
    started = owned = False
    try:
        if address is not None:
            _join(address)
        else:
            _local_only()
            reaper.follow()  # from the first process ray.init starts
            # in this (main) thread: Ray binds gcs_server and the raylet to the life of the thread that starts them
            on_term = signal.getsignal(signal.SIGTERM)
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
            signal.signal(signal.SIGTERM, on_term)  # ray.init puts its own (sys.exit(15)) in place of the caller's
            started = True
        gcs = _ray_worker().global_worker.gcs_client
        lease.claim(gcs)
        owned = True  # the name is this service's: what is deployed under it may be deleted
        gpus = float(ray.cluster_resources().get("GPU", 0))
        plan = plan_pool(settings, gpus)
        if (warning := shortfall(plan, gpus)) is not None:
            log.warning("%s", warning)
        controller_logs, replica_logs = _quiet(settings)
        bounded("starting Ray Serve", DESCRIBE_TIMEOUT_S, serve.start, proxy_location="Disabled",
                logging_config=controller_logs)  # fmt: skip
        log.info("pool %s: deploying %s on Ray (%g GPUs in the cluster)", name, plan.describe(), gpus)
        handle, described = _deploy(settings, plan, name, replica_logs)
        book = ReplicaBook(plan, models=described["replica"]["models"])
        book.refresh(*serve_view(name))
        book.finished(described["replica"])
        engine = PoolEngine(described, book)
        return Pool(handle, plan, book, engine, name, started, lease, reaper, settings.replica_timeout)
    except BaseException:
        _abandon(name, lease, started, owned)
        reaper.done()
        raise


def _abandon(name: str, lease: Lease, started: bool, owned: bool) -> None:
    """After a failed start: this pool's application and name go (never another service's: only once
    the name was this service's), and Ray if this process started it."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if owned:
        try:
            bounded("deleting the pool's replicas", DELETE_TIMEOUT_S, serve.delete, name)
            gcs = _ray_worker().global_worker.gcs_client
            bounded("releasing the pool's name", CALL_TIMEOUT_S, lease.release, gcs)
        except Exception:
            pass
    if started:
        try:
            bounded("stopping Ray", SHUTDOWN_TIMEOUT_S, ray.shutdown)
        except Exception:
            pass
