"""A local HTTP server in the Hugging Face Hub's layout, for tests (``HF_ENDPOINT=http://127.0.0.1:PORT``).

It serves model folders on disk under repo ids, the way huggingface_hub downloads them:

- ``GET /api/models/{repo}/revision/{rev}``: JSON with ``sha`` (the commit) and ``siblings`` (``rfilename``,
  ``size``, ``blobId`` = the git blob SHA-1, and for weights ``lfs`` = {sha256, size, pointerSize});
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the SHA-256 for LFS files,
  also as ``X-Linked-Etag`` with ``X-Linked-Size``; the git SHA-1 for others), ``Content-Length``,
  ``Accept-Ranges``; a ``Range: bytes=N-`` request gets 206 with ``Content-Range``.

Knobs for tests: ``rate`` (bytes per second for LFS files, to interrupt a download mid-way),
``cut_after`` (drop the connection after that many bytes of an LFS file's response, ``cuts`` times),
``corrupt`` (file names served with a changed byte). Every request is recorded in ``requests``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".pth")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/?]+)")


@dataclass
class Served:
    name: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class HubState:
    repos: dict[str, dict[str, Served]]
    rate: float | None = None
    cut_after: int | None = None
    cuts: int = 1_000_000  # how many responses cut_after cuts
    corrupt: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range


def load_folder(folder: Path) -> dict[str, Served]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        files[name] = Served(name, path.read_bytes(), path.suffix in LFS_SUFFIXES)
    return files


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        state = self.server.state
        state.requests.append((self.command, self.path, self.headers.get("Range")))
        api = _API.match(self.path)
        if api:
            files = state.repos.get(api["repo"])
            if files is None:
                return self._error(404, "RepositoryNotFound")
            siblings = []
            for f in files.values():
                entry = {"rfilename": f.name, "size": len(f.data), "blobId": f.blob_id}
                if f.lfs:
                    entry["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
                siblings.append(entry)
            body = json.dumps({"id": api["repo"], "sha": COMMIT, "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        resolve = _RESOLVE.match(self.path)
        files = state.repos.get(resolve["repo"]) if resolve else None
        served = files.get(resolve["path"]) if files and resolve else None
        if served is None:
            return self._error(404, "EntryNotFound")
        data = served.data
        if served.name in state.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                return self._error(416, "RangeNotSatisfiable")
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{served.etag}"')
        if served.lfs:
            self.send_header("X-Linked-Etag", f'"{served.etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        self._send_body(data[start:], served.lfs)

    def _send_body(self, body: bytes, lfs: bool) -> None:
        state = self.server.state
        chunk = 16384
        sent = 0
        for i in range(0, len(body), chunk):
            if lfs and state.cut_after is not None and state.cuts > 0 and sent >= state.cut_after:
                state.cuts -= 1
                self.close_connection = True
                return  # the client sees a body shorter than Content-Length
            piece = body[i : i + chunk]
            try:
                self.wfile.write(piece)
            except (BrokenPipeError, ConnectionResetError):
                return
            sent += len(piece)
            if lfs and state.rate:
                time.sleep(len(piece) / state.rate)

    def _error(self, code: int, kind: str) -> None:
        body = json.dumps({"error": kind}).encode()
        self.send_response(code)
        self.send_header("X-Error-Code", kind)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class HubServer:
    """``with HubServer({"org/name": folder}) as hub:`` ... ``hub.endpoint``."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.state = HubState({repo: load_folder(folder) for repo, folder in repos.items()})
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def total_bytes(self, repo: str) -> int:
        return sum(len(f.data) for f in self.state.repos[repo].values())

    def ranges(self) -> list[str]:
        return [r for _, _, r in self.state.requests if r]
