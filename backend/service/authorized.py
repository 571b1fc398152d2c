"""The client keys a CURVE service admits: read from a folder of ``NAME.key`` files, fail closed.

- The folder is listed, never globbed: a folder named ``auth[x]`` is that folder, not ``authx``
  (pyzmq's ``configure_curve(location=...)`` globs ``location/*.key``).
- A folder that is deleted or unreadable admits nobody (and says so in the log) until it is back.
- One odd entry never shuts anybody out: a symlink loop, a link to a file that cannot be read, a
  folder, a FIFO or a file larger than ``MAX_KEY_FILE_BYTES`` is skipped with one warning (until
  it changes); the other keys stay authorized. A file is read with a bounded read, never whole.
- A resource error (out of file descriptors or memory) is not a change of the folder: the keys in
  memory stay authorized, nobody's session ends, and the next reload tries again.
- ``reload`` reports the keys that were removed, so the service can end their live sessions.
- ``callback`` is the ZAP check (backend/service/zap.py): it reads the current set, which ``reload``
  replaces in one assignment. A key not in that set is looked up on disk once more before it is
  refused, so a client authorized a moment ago gets in at once, not at the service's next reload.
  That lookup changes nothing: additions and removals take effect through ``reload``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from pathlib import Path

import zmq.utils.z85

from krita_sdxl.backend.common.logtext import escaped

log = logging.getLogger(__name__)

MAX_KEY_FILE_BYTES = 64 * 1024  # a public key file is about 200 bytes; anything this large is not one
# errno values that say "not now" (the process or the system is out of a resource) rather than "not
# there": the last good set of keys stays
TRANSIENT = frozenset(getattr(errno, n) for n in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS") if hasattr(errno, n))
_PUBLIC = re.compile(r'^\s*public-key\s*=\s*"([^"]*)"\s*$')

Stamp = tuple[tuple[str, int, int, int], ...]


class Transient(OSError):
    """A resource error while reading the folder: keep what is loaded, try again later."""


def _is_transient(exc: OSError) -> bool:
    return isinstance(exc, Transient) or exc.errno in TRANSIENT


def read_public_key(path: Path) -> bytes:
    """The Z85 public key in a ``NAME.key`` file (zmq.auth's format), read with a bounded read that
    never blocks on a FIFO. ValueError: not a key file; OSError: cannot be read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        chunks, size = [], 0
        while size <= MAX_KEY_FILE_BYTES:
            data = os.read(fd, MAX_KEY_FILE_BYTES + 1 - size)
            if not data:
                break
            chunks.append(data)
            size += len(data)
        if size > MAX_KEY_FILE_BYTES:
            raise ValueError(f"larger than {MAX_KEY_FILE_BYTES // 1024} KiB: not a key file")
    finally:
        os.close(fd)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not text") from None
    for line in text.splitlines():
        match = _PUBLIC.match(line)
        if match:
            key = match.group(1).encode("ascii", "replace")
            if len(key) != 40:
                raise ValueError(f"its public-key is {len(key)} characters, not 40")
            try:
                zmq.utils.z85.decode(key)
            except Exception:
                raise ValueError("its public-key is not Z85 text") from None
            return key
    raise ValueError("no public-key line")


class AuthorizedKeys:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.keys: frozenset[bytes] = frozenset()  # Z85 public keys, as the ZAP request carries them
        self._stamp: Stamp | None = None
        self._missing = False
        self._waiting = False  # a resource error is being waited out
        self._skipped: dict[str, str] = {}  # entry name -> why it is skipped (warned once per reason)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: admit a connecting client whose public key is authorized now."""
        allowed = key in self.keys or self._on_disk_now(key)
        if not allowed:
            log.warning("refused a CURVE client with an unauthorized key %s", escaped(key.decode("ascii", "replace")))
        return allowed

    def __contains__(self, key: bytes) -> bool:
        return key in self.keys

    def _skip(self, name: str, why: str, quiet: bool) -> None:
        if not quiet and self._skipped.get(name) != why:
            log.warning("authorized keys: skipping %s: %s", escaped(self.folder / name, 400), why)
        self._skipped[name] = why

    def _scan(self, quiet: bool = False) -> Stamp:
        """The key files as they are now: name, mtime, size, inode. An entry that cannot be used is
        skipped; Transient for a resource error; OSError when the folder itself cannot be read."""
        entries = []
        seen = set()
        with os.scandir(self.folder) as it:
            for entry in it:
                if not entry.name.endswith(".key"):
                    continue
                seen.add(entry.name)
                try:
                    info = os.stat(entry.path)  # follows links: a loop gives ELOOP, a hidden target EACCES
                except OSError as exc:
                    if _is_transient(exc):
                        raise Transient(exc.errno, exc.strerror) from None
                    self._skip(entry.name, f"cannot be read ({exc.strerror or exc})", quiet)
                    continue
                if not stat.S_ISREG(info.st_mode):
                    self._skip(entry.name, "not a regular file", quiet)
                    continue
                if info.st_size > MAX_KEY_FILE_BYTES:
                    self._skip(entry.name, f"larger than {MAX_KEY_FILE_BYTES // 1024} KiB: not a key file", quiet)
                    continue
                entries.append((entry.name, info.st_mtime_ns, info.st_size, info.st_ino))
        if not quiet:
            for gone in set(self._skipped) - seen:
                del self._skipped[gone]
        return tuple(sorted(entries))

    def _on_disk_now(self, key: bytes) -> bool:
        """Whether ``key`` is in the folder as it is now, when the folder changed since the last reload."""
        try:
            stamp = self._scan(quiet=True)
            return stamp != self._stamp and key in self._load(stamp, quiet=True)
        except OSError:
            return False

    def _load(self, stamp: Stamp, quiet: bool = False) -> frozenset[bytes]:
        keys = set()
        for name, *_ in stamp:
            try:
                keys.add(read_public_key(self.folder / name))
            except OSError as exc:
                if _is_transient(exc):
                    raise Transient(exc.errno, exc.strerror) from None
                self._skip(name, f"cannot be read ({exc.strerror or exc})", quiet)
            except ValueError as exc:
                self._skip(name, f"not a CURVE public key file ({exc})", quiet)
            else:
                if not quiet:
                    self._skipped.pop(name, None)
        return frozenset(keys)

    def reload(self) -> frozenset[bytes]:
        """Re-read the folder if it changed; returns the keys that are no longer authorized."""
        try:
            stamp = self._scan()
            if stamp == self._stamp:
                return frozenset()
            keys = self._load(stamp)
        except OSError as exc:
            if _is_transient(exc):
                if not self._waiting:
                    log.error(
                        "authorized keys folder %s cannot be read now (%s): the %d key(s) loaded before stay "
                        "authorized; trying again",
                        self.folder,
                        exc.strerror or exc,
                        len(self.keys),
                    )
                self._waiting = True
                return frozenset()
            if not self._missing:
                log.error(
                    "authorized keys folder %s cannot be read (%s): no client is admitted until it is back",
                    self.folder,
                    exc.strerror or exc,
                )
            self._missing, self._stamp = True, None
            return self._replace(frozenset())
        if self._waiting:
            log.warning("authorized keys folder %s can be read again", self.folder)
            self._waiting = False
        self._stamp = stamp
        if self._missing:
            log.warning("authorized keys folder %s is back", self.folder)
            self._missing = False
        log.info("authorized client keys (re)loaded from %s: %d key(s)", self.folder, len(keys))
        return self._replace(keys)

    def _replace(self, keys: frozenset[bytes]) -> frozenset[bytes]:
        removed = self.keys - keys
        self.keys = keys
        if removed:
            log.warning("%d client key(s) no longer authorized: their sessions end now", len(removed))
        return removed
