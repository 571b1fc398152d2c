"""Soak run shared by the CI test (short) and the benchmark (1,000 jobs): 8 clients, each checks that
every result it gets is its own, exactly once, while the service's resident memory is sampled."""

from __future__ import annotations

import random
import threading
import time

from krita_sdxl.backend.cli.client import ServiceClient
from krita_sdxl.protocol import Image, ImageSpec


def rgba(w: int, h: int, seed: int = 0) -> Image:
    return Image(ImageSpec(w, h, "RGBA", 8), random.Random(seed).randbytes(w * h * 4))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run_soak(endpoint: str, pid: int, jobs: int, clients: int = 8) -> dict:
    """Each client sends its own jobs; every result must be its own, exactly once."""
    per_client = jobs // clients
    errors: list[str] = []
    got: dict[int, list[tuple[str, int, int, int]]] = {i: [] for i in range(clients)}
    rss: list[int] = []

    def work(i: int) -> None:
        try:
            with ServiceClient(endpoint, timeout=120) as c:
                pending = {}
                for k in range(per_client):
                    w, h = 16 + 8 * i, 16 + 8 * (k % 4)
                    job = c.submit(
                        rgba(w, h, seed=k),
                        job=f"c{i}-j{k}",
                        prompt=f"client {i}",
                        steps=2,
                        strength=1.0,
                        seed=1000 * i + k,
                    )
                    pending[job] = (w, h, 1000 * i + k)
                    while len(pending) >= 3:  # keep a few in flight, as a plugin would
                        _collect(c, pending, got[i])
                while pending:
                    _collect(c, pending, got[i])
        except Exception as exc:  # reported below
            errors.append(f"client {i}: {exc!r}")

    def _collect(c, pending, out) -> None:
        e = c.receive()
        if e.type == "result":
            w, h, seed = pending.pop(e.job)
            img = e.images["image"].spec
            out.append((e.job, img.width, img.height, e["seed"]))
            if (img.width, img.height, e["seed"]) != (w, h, seed):
                errors.append(f"{e.job}: got {img.width}x{img.height} seed {e['seed']}, sent {w}x{h} seed {seed}")
        elif e.type in ("error", "cancelled"):
            errors.append(f"{e.job}: {e.type} {e.fields}")
            pending.pop(e.job, None)

    def sample_rss() -> None:
        while any(t.is_alive() for t in threads):
            rss.append(rss_kib(pid))
            time.sleep(0.2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    for t in threads:
        t.join()
    sampler.join()
    elapsed = time.monotonic() - t0
    ids = [j for results in got.values() for j, *_ in results]
    warm = rss[max(1, len(rss) // 10)] if rss else rss_kib(pid)
    end = rss_kib(pid)
    return {
        "jobs": per_client * clients,
        "results": len(ids),
        "unique": len(set(ids)),
        "errors": errors,
        "seconds": round(elapsed, 1),
        "rss_after_warmup_kib": warm,
        "rss_end_kib": end,
        "rss_growth": round(end / warm - 1, 3),
    }
