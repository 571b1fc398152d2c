"""A failed step, told to a person: which step, why (read from the command's output), what to do.

The setups people get stuck in fail in a few known ways (no build of torch for that Python, the index
cannot be reached, the disk is full, a download breaks off); each is recognised in the output of the
command that failed. Anything else says where the whole output is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import events

_NO_SPACE = re.compile(r"No space left on device|Errno 28|ENOSPC|disk is full", re.IGNORECASE)
_NO_BUILD = re.compile(r"No matching distribution found for (\S+)|Could not find a version that satisfies the "
                       r"requirement (\S+)", re.IGNORECASE)  # fmt: skip
_UNREACHABLE = re.compile(
    r"Failed to establish a new connection|Name or service not known|Temporary failure in name resolution|"
    r"getaddrinfo failed|Connection refused|ConnectTimeout|Read timed out|Network is unreachable|"
    r"ProxyError|Cannot connect to proxy|nodename nor servname",
    re.IGNORECASE,
)
_CONFLICT = re.compile(r"Cannot install (.+?) because these package versions have conflicting dependencies")
_CAUSES = re.compile(r"The conflict is caused by:\n((?:[ \t]+\S.*\n?)+)")
_SSL = re.compile(r"SSLError|CERTIFICATE_VERIFY_FAILED", re.IGNORECASE)
_HASH = re.compile(r"DO NOT MATCH THE HASHES|hash mismatch", re.IGNORECASE)
_NO_ENSUREPIP = re.compile(r"ensurepip is not available|No module named ensurepip", re.IGNORECASE)
_DENIED = re.compile(r"Permission denied|Access is denied|Errno 13", re.IGNORECASE)
_INDEX = re.compile(r"Looking in indexes:\s*(\S+)")


@dataclass(frozen=True)
class Failure:
    step: str  # the step's title
    why: str
    what: str  # what to do

    @property
    def text(self) -> str:
        return f"“{self.step}” failed: {self.why} {self.what}"


def _index(output: str) -> str:
    match = _INDEX.search(output)
    return match.group(1).rstrip(",") if match else "the package index"


def explain(step_key: str, step_title: str, code: int | None, output: str, log_path: str = "") -> Failure:
    """Why the command of ``step_key`` that exited with ``code`` (None: it did not start) failed."""
    log = f" The whole output is in {log_path}." if log_path else " The whole output is in the setup log."
    if step_key == "models":
        for text in reversed(output.splitlines()):
            event = events.parse(text)
            if event and event["event"] == "error":
                return Failure(step_title, str(event.get("why", "")), str(event.get("what", "")) + log)
    if code is None:
        return Failure(step_title, f"the command could not be started ({output.strip() or 'not found'}).",
                       "Check the folder and that the Python found still exists, then click Repair." + log)  # fmt: skip
    if _NO_SPACE.search(output):
        return Failure(step_title, "the disk is full.", "Free some space (or choose a folder on another disk), "
                       "then click Repair: finished steps are kept." + log)  # fmt: skip
    if _NO_ENSUREPIP.search(output):
        return Failure(step_title, "this Python cannot make virtual environments (no ensurepip).",
                       "Install its venv package (Debian, Ubuntu: sudo apt install python3-venv), then click "
                       "Repair." + log)  # fmt: skip
    match = _NO_BUILD.search(output)
    if match:
        wanted = match.group(1) or match.group(2)
        return Failure(step_title, f"pip found no {wanted} for this Python and computer at {_index(output)}.",
                       "Check that the computer is online and that the Python used is 3.10 to 3.13 (64-bit); "
                       "or choose another PyTorch build (CPU always exists), then click Repair." + log)  # fmt: skip
    match = _CONFLICT.search(output)
    if match:
        causes = _CAUSES.search(output)
        detail = "; ".join(c.strip() for c in causes.group(1).splitlines()) if causes else "see the log"
        return Failure(step_title, f"pip could not install {match.group(1)}: no version fits ({detail}).",
                       "Check that the computer is online and what pip is configured with (an index, find-links or "
                       "constraints that leave no such version), or choose another PyTorch build; then click "
                       "Repair." + log)  # fmt: skip
    if _SSL.search(output):
        return Failure(step_title, f"the secure connection to {_index(output)} failed (a proxy or antivirus "
                       "intercepting HTTPS?).", "Let Python reach the internet (pip's certificate settings), "
                       "then click Repair." + log)  # fmt: skip
    if _UNREACHABLE.search(output):
        return Failure(step_title, f"{_index(output)} could not be reached.",
                       "Check the internet connection (and HTTPS_PROXY behind a proxy), then click Repair: "
                       "finished steps and downloads are kept." + log)  # fmt: skip
    if _HASH.search(output):
        return Failure(step_title, "a downloaded package was damaged on the way.", "Click Repair to fetch it again."
                       + log)  # fmt: skip
    if _DENIED.search(output):
        return Failure(
            step_title,
            "a file could not be written (permission denied).",
            "Choose a folder you can write to (or close programs using it), then click Repair." + log,
        )
    last = [t for t in output.strip().splitlines() if t.strip()][-1:] or [""]
    detail = f": {last[0].strip()[:300]}" if last[0] else ""
    return Failure(step_title, f"the command exited with code {code}{detail}.", "Click Repair to try again." + log)
