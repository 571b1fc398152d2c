"""Start (or join) Ray, deploy the replicas, and tear them down: the pool as ``serve`` holds it."""

from __future__ import annotations

import functools
import logging
import socket
from dataclasses import dataclass, replace
from typing import Any

from krita_sdxl.backend.common.config import ConfigError, Settings

from .capabilities import PoolEngine, ReplicaBook
from .plan import APP, PoolPlan, plan_pool, shortfall

log = logging.getLogger("krita_sdxl.pool")
DESCRIBE_TIMEOUT_S = 600.0  # a replica loads its models first (minutes for the real SDXL on a cold disk)


@dataclass
class Pool:
    handle: Any  # the deployment's DeploymentHandle
    plan: PoolPlan
    book: ReplicaBook
    engine: PoolEngine
    started_ray: bool  # this process started Ray (and stops it); else it joined a cluster

    @property
    def dispatcher(self) -> Any:
        """The service's ``worker`` factory: the pool's dispatcher (backend/pool/dispatcher.py)."""
        from .dispatcher import Dispatcher

        return functools.partial(
            Dispatcher, handle=self.handle, book=self.book, slots=self.plan.slots, serve_view=serve_view
        )

    def close(self) -> None:
        """Delete the application (its replicas stop); stop Ray if this process started it."""
        import ray
        from ray import serve

        try:
            serve.delete(APP)
            if self.started_ray:
                serve.shutdown()
        except Exception:
            log.exception("could not stop the pool's replicas cleanly")
        finally:
            if self.started_ray:
                ray.shutdown()


def serve_view() -> list[dict[str, Any]]:
    """Ray Serve's replicas of the application: [{replica, state, node, pid}] (the controller's details)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:  # Serve is not running in this process
        return []
    details = client.get_serve_details()
    app = (details.get("applications") or {}).get(APP) or {}
    rows = []
    for deployment in (app.get("deployments") or {}).values():
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
    return rows


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """The cluster's head answers on its port: ``ray.init`` would wait for an unreachable one for many
    minutes. ConfigError names the address (``auto``: the one ``ray start`` left on this machine)."""
    from ray._private.services import canonicalize_bootstrap_address

    if address.startswith("ray://"):
        return  # Ray Client: its own connection, with its own timeout
    hint = "start one with `ray start --head`, or leave out --ray-address to start a local Ray"
    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise ConfigError(f"--ray-address {address}: {exc} ({hint})") from None
    if resolved is None:
        raise ConfigError(f"--ray-address {address}: no running Ray cluster found on this machine ({hint})")
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {resolved}: {exc} ({hint})") from None


def _quiet(settings: Settings) -> dict[str, Any]:
    """Serve's logging: no access log line per request unless debugging."""
    debug = settings.log_level == "debug"
    if not debug:
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return {"log_level": "DEBUG" if debug else "WARNING", "enable_access_log": debug}


def start_pool(settings: Settings) -> Pool:
    """Start a local Ray (or join ``settings.ray_address``), deploy the replicas and wait until one has
    loaded its models. ConfigError (one line) when Ray cannot be reached or the replicas cannot start."""
    import ray
    from ray import serve

    from .replica import Replica

    address = settings.ray_address or None
    if address is not None:
        check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        hint = "is `ray start --head` running there?"
        raise ConfigError(f"cannot join the Ray cluster at {address}: {first} ({hint})") from None
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        plan = plan_pool(settings, gpus)
        if (warning := shortfall(plan, gpus)) is not None:
            log.warning("%s", warning)
        logging_config = _quiet(settings)
        serve.start(proxy_location="Disabled", logging_config=logging_config)
        # Replicas read the same cache folder (the demo model) even where KRITA_SDXL_CACHE is not set
        replica_settings = replace(settings, cache_dir=str(settings.cache_path))
        app = Replica.options(**plan.deployment_options()).bind(replica_settings, bool(plan.gpus))
        log.info("pool: deploying %s on Ray (%g GPUs in the cluster)", plan.describe(), gpus)
        try:
            handle = serve.run(app, name=APP, route_prefix=None, logging_config=logging_config)
            described = handle.options(method_name="describe").remote().result(timeout_s=DESCRIBE_TIMEOUT_S)
        except Exception as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            why = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
            raise ConfigError(f"the pool's replicas could not start: {why.strip()[:400]}") from None
        book = ReplicaBook(plan, models=described["replica"]["models"])
        book.refresh(serve_view())
        book.finished(described["replica"])
        return Pool(handle, plan, book, PoolEngine(described, book), started_ray=address is None)
    except BaseException:
        try:
            serve.delete(APP)
        except Exception:
            pass
        if address is None:
            ray.shutdown()
        raise
