"""The GPU pool's pure parts (no Ray started): its settings as the command line checks them, its layout,
the routing key of generate jobs and what ``welcome`` reports about the replicas."""

from __future__ import annotations

import pytest
from cli_helpers import assert_refused, krita_sdxl

from krita_sdxl.backend.common.config import ConfigError, Settings
from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.pool.capabilities import ReplicaBook
from krita_sdxl.backend.pool.plan import PoolPlan, check_pool, plan_pool, routing_key, shortfall
from krita_sdxl.protocol import CLIENT, Image, ImageSpec, decode, encode


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--replicas", "2"], ["--replicas", "add --pool ray"]),
        (["--ray-address", "auto"], ["--ray-address", "add --pool ray"]),
        (["--pool", "ray", "--replicas", "2", "--max-replicas", "4"], ["either --replicas"]),
        (["--pool", "ray", "--min-replicas", "3", "--max-replicas", "2"], ["--min-replicas 3 is more than"]),
        (["--pool", "ray", "--min-replicas", "1"], ["--min-replicas needs --max-replicas"]),
        (["--pool", "ray", "--device", "cpu"], ["--device cpu does not apply to --pool ray"]),
        (["--pool", "rey"], ["--pool", "invalid choice"]),
        (["--pool", "ray", "--ray-address", "127.0.0.1:9"], ["cannot reach the Ray cluster", "ray start --head"]),
    ],
)
def test_serve_refuses_pool_settings_that_do_not_fit(args, words):
    """Typed as a person would, refused before anything starts (no Ray, no model)."""
    assert_refused(krita_sdxl("serve", "--identity", "--endpoint", "tcp://127.0.0.1:*", *args, timeout=60), 2, *words)


def test_a_toml_pool_is_checked_like_the_flags():
    check_pool(Settings(pool="ray", replicas=2))  # fine: Ray Serve is installed with the test extras
    with pytest.raises(ConfigError, match="only apply to a pool"):
        check_pool(Settings(max_replicas=3))


def test_the_layout_follows_the_clusters_gpus():
    assert plan_pool(Settings(pool="ray"), 4.0) == PoolPlan(4, 4, 1)  # one replica per GPU
    assert plan_pool(Settings(pool="ray"), 0.0) == PoolPlan(1, 1, 0)  # CPU: one replica
    assert plan_pool(Settings(pool="ray", replicas=2), 0.0) == PoolPlan(2, 2, 0)
    scaling = plan_pool(Settings(pool="ray", min_replicas=1, max_replicas=3), 8.0)
    assert scaling == PoolPlan(1, 3, 1) and scaling.autoscaling and scaling.slots == 3
    options = scaling.deployment_options()
    assert options["ray_actor_options"]["num_gpus"] == 1 and options["max_ongoing_requests"] == 1
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    fixed = PoolPlan(2, 2, 0).deployment_options()
    assert fixed["num_replicas"] == 2 and "num_gpus" not in fixed["ray_actor_options"]
    assert "wait until hosts with GPUs join" in (shortfall(PoolPlan(4, 4, 1), 2.0) or "")
    assert shortfall(PoolPlan(2, 2, 1), 2.0) is None


def _request(mode: str) -> RefineRequest:
    image = Image(ImageSpec(8, 8, "RGBA", 8), bytes(256))
    msg = decode(CLIENT, encode(CLIENT, "submit", images={"image": image}, job="j", mode=mode, strength=1.0))
    return RefineRequest.from_message(msg, 1)


def test_jobs_that_need_the_base_are_routed_by_it():
    assert routing_key(_request("generate")) == routing_key(_request("two_stage")) == "base"
    assert routing_key(_request("refine")) == ""


def test_the_book_merges_ray_serves_view_with_the_replicas_events():
    book = ReplicaBook(PoolPlan(2, 2, 1))
    book.refresh([{"replica": "a", "state": "RUNNING", "node": "10.0.0.1", "pid": 11},
                  {"replica": "b", "state": "STARTING", "node": "10.0.0.2", "pid": 12}])  # fmt: skip
    book.started({"replica": "a", "device": "cuda", "gpu": "H100", "models": ["refiner"], "jobs": 0}, "job-1")
    cap = book.capability()
    assert (cap["kind"], cap["replicas"], cap["gpus"], cap["autoscaling"]) == ("ray", 1, 1, False)
    a, b = cap["replica_states"]
    assert (a["replica"], a["state"], a["node"], a["gpu"]) == ("a", "busy", "10.0.0.1", "H100")
    assert (b["replica"], b["state"]) == ("b", "starting")
    book.finished({"replica": "a", "models": ["refiner", "base"], "jobs": 1})
    assert book.replica("a")["state"] == "idle" and book.replica("a")["models"] == ["refiner", "base"]
    book.lost("a")
    assert book.replica("a")["state"] == "lost"
    book.refresh([{"replica": "a", "state": "RUNNING"}, {"replica": "b", "state": "RUNNING"}])
    assert book.replica("a")["state"] == "lost"  # until Ray Serve stops listing it
    book.refresh([{"replica": "b", "state": "RUNNING"}, {"replica": "c", "state": "STARTING"}])
    assert [r["replica"] for r in book.capability()["replica_states"]] == ["b", "c"]
    assert book.capability()["replicas"] == 1
