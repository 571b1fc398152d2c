"""Open files: raise this process's soft limit to the hard one at start (systemd's default soft limit is
1024, which 1,100 idle TCP connections exhaust: libzmq then spins on accept and every file the service
opens fails with EMFILE). Unix only; elsewhere nothing changes."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

RESERVED_FILES = 256  # descriptors kept for the service's own files (models, keys, logs, pipes) below the cap


def raise_open_files_limit() -> int | None:
    """Set RLIMIT_NOFILE's soft limit to its hard limit; returns the soft limit now (None: unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # e.g. macOS caps it at OPEN_MAX
        log.warning("could not raise the open files limit from %d to %d: %s", soft, target, exc)
        return soft
    log.info("open files limit raised from %d to %d", soft, target)
    return target


def connection_cap(wanted: int, files_limit: int | None) -> int:
    """The most connections the service accepts: ``wanted``, less where the open files limit would
    not leave ``RESERVED_FILES`` for everything else (never below 16)."""
    if files_limit is None or files_limit <= 0:
        return wanted
    return max(16, min(wanted, files_limit - RESERVED_FILES))
