"""The client keys a CURVE service admits: read from a folder of ``NAME.key`` files, fail closed.

- The folder is listed, never globbed: a folder named ``auth[x]`` is that folder, not ``authx``
  (pyzmq's ``configure_curve(location=...)`` globs ``location/*.key``).
- A folder that is deleted or unreadable admits nobody (and says so in the log) until it is back.
- ``reload`` reports the keys that were removed, so the service can end their live sessions.
- ``callback`` is pyzmq's ZAP credentials provider hook: it runs in the authenticator thread and
  reads the current set, which ``reload`` replaces in one assignment. A key not in that set is
  looked up on disk once more before it is refused, so a client authorized a moment ago gets in at
  once, not at the service's next reload (CI saw one refused in that window on a busy machine). That
  lookup changes nothing: additions and removals take effect through ``reload``, in the I/O thread.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq.auth

log = logging.getLogger(__name__)

Stamp = tuple[tuple[str, int, int], ...]


class AuthorizedKeys:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.keys: frozenset[bytes] = frozenset()  # Z85 public keys, as pyzmq's ZAP handler passes them
        self._stamp: Stamp | None = None
        self._missing = False

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: admit a connecting client whose public key is authorized now."""
        allowed = key in self.keys or self._on_disk_now(key)
        if not allowed:
            log.warning("refused a CURVE client with an unauthorized key %s", key.decode("ascii", "replace"))
        return allowed

    def __contains__(self, key: bytes) -> bool:
        return key in self.keys

    def _scan(self) -> Stamp:
        entries = []
        with os.scandir(self.folder) as it:
            for entry in it:
                if entry.name.endswith(".key") and entry.is_file():
                    info = entry.stat()
                    entries.append((entry.name, info.st_mtime_ns, info.st_size))
        return tuple(sorted(entries))

    def _on_disk_now(self, key: bytes) -> bool:
        """Whether ``key`` is in the folder as it is now, when the folder changed since the last reload."""
        try:
            stamp = self._scan()
        except OSError:
            return False
        return stamp != self._stamp and key in self._load(stamp, quiet=True)

    def _load(self, stamp: Stamp, quiet: bool = False) -> frozenset[bytes]:
        keys = set()
        for name, _, _ in stamp:
            path = self.folder / name
            try:
                public, _secret = zmq.auth.load_certificate(str(path))
            except (OSError, ValueError) as exc:
                if not quiet:
                    log.warning("ignoring %s: not a CURVE public key file (%s)", path, exc)
                continue
            if public:
                keys.add(bytes(public))
        return frozenset(keys)

    def reload(self) -> frozenset[bytes]:
        """Re-read the folder if it changed; returns the keys that are no longer authorized."""
        try:
            stamp = self._scan()
        except OSError as exc:
            if not self._missing:
                log.error(
                    "authorized keys folder %s cannot be read (%s): no client is admitted until it is back",
                    self.folder,
                    exc.strerror or exc,
                )
            self._missing, self._stamp = True, None
            return self._replace(frozenset())
        if stamp == self._stamp:
            return frozenset()
        self._stamp = stamp
        if self._missing:
            log.warning("authorized keys folder %s is back", self.folder)
            self._missing = False
        keys = self._load(stamp)
        log.info("authorized client keys (re)loaded from %s: %d key(s)", self.folder, len(keys))
        return self._replace(keys)

    def _replace(self, keys: frozenset[bytes]) -> frozenset[bytes]:
        removed = self.keys - keys
        self.keys = keys
        if removed:
            log.warning("%d client key(s) no longer authorized: their sessions end now", len(removed))
        return removed
