"""Who holds a pool name on the cluster: a record in Ray's key-value store (on the head), renewed every few
seconds by the service that holds it. A second live service that asks for the same name is refused
before it deploys anything, so that it never redeploys (and later deletes) the first one's replicas. A
record nobody renewed for :data:`STALE_S` is a crashed service's: the name is free again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from krita_sdxl.backend.common.config import ConfigError

log = logging.getLogger("krita_sdxl.pool")

NAMESPACE = "krita-sdxl"
RENEW_S = 5.0
STALE_S = 30.0  # six renewals missed: the holder is gone (clocks of the cluster's hosts agree within this)
CALL_TIMEOUT_S = 5.0


def _key(name: str) -> str:
    return f"pool/{name}"


@dataclass
class Lease:
    name: str
    endpoint: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def _record(self) -> bytes:
        me = {"host": self.host, "pid": self.pid, "endpoint": self.endpoint, "renewed": time.time()}
        return json.dumps(me).encode()

    def _mine(self, record: dict[str, Any]) -> bool:
        return record.get("host") == self.host and record.get("pid") == self.pid

    def claim(self, gcs: Any) -> None:
        """Take the name, or ConfigError when another live service holds it."""
        raw = gcs.internal_kv_get(_key(self.name).encode(), NAMESPACE.encode(), timeout=CALL_TIMEOUT_S)
        record = _parse(raw)
        if record is not None and not self._mine(record):
            age = time.time() - float(record.get("renewed", 0))
            if age < STALE_S:
                raise ConfigError(
                    f"the pool name {self.name!r} is in use on this Ray cluster by the service on "
                    f"{record.get('host')} (process {record.get('pid')}, {record.get('endpoint')}), renewed "
                    f"{max(age, 0):.0f} s ago: give this service another --pool-name"
                )
            log.warning("pool: taking over the name %s from a service gone %.0f s ago", self.name, age)
        self.renew(gcs)

    def renew(self, gcs: Any) -> None:
        gcs.internal_kv_put(_key(self.name).encode(), self._record(), True, NAMESPACE.encode(), timeout=CALL_TIMEOUT_S)

    def release(self, gcs: Any) -> None:
        """Give the name back, if it is still this service's."""
        raw = gcs.internal_kv_get(_key(self.name).encode(), NAMESPACE.encode(), timeout=CALL_TIMEOUT_S)
        record = _parse(raw)
        if record is not None and self._mine(record):
            gcs.internal_kv_del(_key(self.name).encode(), False, NAMESPACE.encode(), timeout=CALL_TIMEOUT_S)


def _parse(raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
