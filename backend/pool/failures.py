"""What the service says when the pool's replicas cannot start or none is left. Pure: no Ray.

Ray Serve reports a replica that fails in its constructor as "Deploying application X failed: Failed to
update the deployments ['Replica']", with the cause buried in the deployment's status message (a
traceback, repeated for each retry). A replica raises :data:`MARKER` with one line that says what went
wrong and where (backend/pool/replica.py); these functions find that line (else the innermost exception
line of the traceback) and put it first in the service's message.
"""

from __future__ import annotations

import re

MARKER = "krita-sdxl replica could not start"  # the replica's own one-line reason follows ": "
_EXCEPTION_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Exit)): (.+)$")
LIMIT = 400  # characters of a cause quoted in a message


def first_error_line(text: str) -> str | None:
    """The replica's own reason (after :data:`MARKER`), else the innermost ``SomeError: message`` line of
    the traceback in ``text`` (the class without its module), else None."""
    for line in text.splitlines():
        at = line.find(MARKER + ": ")
        if at >= 0:
            return line[at + len(MARKER) + 2 :].strip()[:LIMIT]
    found = None
    for line in text.splitlines():
        m = _EXCEPTION_LINE.match(line)
        if m and not m.group(2).startswith("Traceback"):
            found = f"{m.group(1)}: {m.group(2).strip()}"
    return found[:LIMIT] if found else None


def start_failure(error: str, status_messages: list[str]) -> str:
    """The one line for replicas that could not start: the replica's reason first, then what Ray Serve
    said (``error``: the exception serve.run raised; ``status_messages``: the deployments' messages)."""
    for text in [*status_messages, error]:
        cause = first_error_line(text)
        if cause:
            return f"the pool's replicas could not start: {cause}"
    said = next((line.strip() for line in error.splitlines() if line.strip()), "no reason given")
    waiting = next((m for m in status_messages if m.strip()), "")
    more = f"; Ray Serve says: {_one_line(waiting)}" if waiting else ""
    return f"the pool's replicas could not start: {said[:LIMIT]}{more}"


def no_replica(waited: float, status_messages: list[str]) -> str:
    """The ``model_error`` message of a job that waited ``waited`` seconds while no replica was running."""
    cause = next((c for c in (first_error_line(m) for m in status_messages) if c), None)
    said = (cause or next((_one_line(m) for m in status_messages if m.strip()), "")).rstrip(".")
    why = f": {said}" if said else " (all were lost, and none has started again)"
    return (
        f"no replica of the GPU pool is running{why}. The job waited {waited:.0f} s for one (--replica-timeout); "
        "submit it again when the pool is back"
    )


def unavailable(status_messages: list[str]) -> str:
    """The ``model_error`` message of a job whose deployment Ray Serve no longer offers (it failed to
    deploy, or was deleted from the cluster)."""
    cause = next((c for c in (first_error_line(m) for m in status_messages) if c), None)
    said = (cause or next((_one_line(m) for m in status_messages if m.strip()), "")).rstrip(".")
    why = f": {said}" if said else " (it failed, or was deleted from the cluster)"
    return f"the GPU pool's replicas are unavailable{why}; the service needs a restart"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:LIMIT].rstrip(".")
