"""How the pool is laid out, from the settings and the cluster's GPUs. Pure: no Ray here.

- One replica per GPU (``num_gpus=1``): a replica is one engine, and a job holds its GPU for seconds,
  so a replica takes one job at a time (``max_ongoing_requests=1``) and the dispatcher keeps as many
  jobs in flight as there are replicas. With autoscaling it keeps ``max_replicas`` in flight: Ray Serve
  scales on the requests waiting at the handle, so demand must reach it.
- Without GPUs the replicas run on the CPU (the demo model in CI), each reserving half a Ray CPU.
- Each service's replicas are its own Ray Serve application, named per service (``--pool-name``; by default
  from this host and the endpoint, which no other live service on this host can hold), so that several
  services share one cluster and none ever redeploys or deletes another's replicas.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from krita_sdxl.backend.common.config import ConfigError, Settings
from krita_sdxl.backend.engine.request import RefineRequest

NAME_PREFIX = "krita-sdxl"  # every default pool name starts with it
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
BASE = "base"  # the multiplexed model id of jobs that run the base model (generate, two_stage)
CPU_SHARE = 0.5  # Ray CPUs a replica reserves: a scheduling share (CPU replicas run torch on one thread)
POOL_ONLY = {"replicas": "--replicas", "min_replicas": "--min-replicas", "max_replicas": "--max-replicas",
             "ray_address": "--ray-address", "pool_name": "--pool-name",
             "replica_timeout": "--replica-timeout"}  # fmt: skip


@dataclass(frozen=True)
class PoolPlan:
    replicas: int  # the fixed number, or the autoscaling minimum
    max_replicas: int  # the same as replicas when the number is fixed
    gpus: int  # GPUs per replica: 1, or 0 (CPU replicas)

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas != self.replicas

    @property
    def slots(self) -> int:
        """Jobs the dispatcher keeps in flight."""
        return self.max_replicas

    def deployment_options(self) -> dict[str, Any]:
        """Options for ``Replica.options(...)``."""
        actor: dict[str, Any] = {"num_cpus": CPU_SHARE}
        if self.gpus:
            actor["num_gpus"] = self.gpus
        options: dict[str, Any] = {
            "max_ongoing_requests": 1,  # one job per replica: it holds the GPU
            "ray_actor_options": actor,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 60.0,  # a busy replica answers between steps
            "graceful_shutdown_timeout_s": 10.0,
            "max_constructor_retry_count": 3,  # a model that cannot load fails the start, not 20 times
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.replicas,
                "initial_replicas": max(self.replicas, 1),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 3.0,
                "look_back_period_s": 15.0,  # jobs last seconds: react to the last few (metrics come every 10 s)
                "downscale_delay_s": 600.0,  # models stay resident through a coffee break
            }
        else:
            options["num_replicas"] = self.replicas
        return options

    def describe(self) -> str:
        what = "GPU" if self.gpus else "CPU"
        if self.autoscaling:
            return f"{self.replicas} to {self.max_replicas} {what} replicas (autoscaling)"
        return f"{self.replicas} {what} replica{'s' if self.replicas != 1 else ''}"


def check_pool(settings: Settings) -> None:
    """The pool settings fit together (before anything starts); ConfigError names the problem."""
    defaults = Settings()
    if settings.pool != "ray":
        given = [flag for name, flag in POOL_ONLY.items() if getattr(settings, name) != getattr(defaults, name)]
        if given:
            raise ConfigError(f'{", ".join(given)} only apply to a pool: add --pool ray (or pool = "ray")')
        return
    if settings.max_replicas and settings.replicas:
        raise ConfigError("give either --replicas N (a fixed number) or --min-replicas/--max-replicas (autoscaling)")
    if settings.min_replicas and not settings.max_replicas:
        raise ConfigError("--min-replicas needs --max-replicas (autoscaling between the two)")
    if settings.max_replicas and settings.min_replicas > settings.max_replicas:
        raise ConfigError(f"--min-replicas {settings.min_replicas} is more than --max-replicas {settings.max_replicas}")
    if settings.device != "auto":
        raise ConfigError(
            f"--device {settings.device} does not apply to --pool ray: each replica runs on the GPU Ray gives it, "
            "or on the CPU where the cluster has no GPUs"
        )
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise ConfigError("--pool ray needs Ray Serve: pip install 'krita-sdxl[pool]'") from None


def check_pool_name(name: str) -> str:
    """A pool name as Ray Serve and Ray's actor names take it; ValueError says what fits."""
    if not NAME_RE.fullmatch(name):
        raise ValueError("must be 1 to 80 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def default_pool_name(endpoint: str, host: str, pid: int) -> str:
    """``krita-sdxl-HOST-HASH``: HASH (of the endpoint) tells apart the services of one host, which cannot
    listen on the same endpoint while both live. A restarted service takes its crashed predecessor's
    application over instead of leaving its replicas behind. An endpoint with a wildcard port (``*``,
    tests) names no service: the process id is added."""
    digest = hashlib.sha256(endpoint.encode()).hexdigest()[:8]
    safe_host = re.sub(r"[^A-Za-z0-9.-]+", "-", host).strip(".-")[:40] or "host"
    name = f"{NAME_PREFIX}-{safe_host}-{digest}"
    return f"{name}-{pid}" if endpoint.endswith(":*") else name


def plan_pool(settings: Settings, cluster_gpus: float) -> PoolPlan:
    """The layout for this cluster: GPU replicas when it has GPUs, else CPU replicas."""
    gpus = 1 if cluster_gpus >= 1 else 0
    if settings.max_replicas:
        return PoolPlan(settings.min_replicas, settings.max_replicas, gpus)
    n = settings.replicas or (int(cluster_gpus) if gpus else 1)
    return PoolPlan(n, n, gpus)


def shortfall(plan: PoolPlan, cluster_gpus: float) -> str | None:
    """A warning when the cluster has fewer GPUs than the plan's replicas want (they wait for hosts)."""
    want = plan.replicas * plan.gpus
    if plan.gpus and want > cluster_gpus:
        return (
            f"{plan.replicas} replicas want {want} GPUs but the cluster has {cluster_gpus:g}: the rest wait until "
            "hosts with GPUs join (ray start --address=...)"
        )
    return None


def routing_key(req: RefineRequest) -> str:
    """The multiplexed model id a job is routed by: Ray Serve sends the jobs that need the base to a
    replica that already holds it (refine jobs name none: any replica holds the refiner)."""
    from krita_sdxl.backend.engine.stages import BASE_MODES

    return BASE if req.mode in BASE_MODES else ""
