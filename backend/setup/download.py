"""Download the models into the Hugging Face cache: resumable, sizes and checksums verified.

huggingface_hub lists the repo (``model_info``, with every file's size and checksum), names the URLs
(``hf_hub_url``, honouring ``HF_ENDPOINT``) and the request headers (token, user agent), and lays out
the snapshot (``hf_hub_download`` once the blob is in place: it only links it). The bytes are fetched
here, into ``blobs/<etag>.incomplete``, continued with an HTTP Range request by the next run after an
interruption: huggingface_hub 1.x and later throw a partial download away (each download writes a
process-unique temporary file, removed on failure), and a 6 GB download must survive a cancel.
"""

from __future__ import annotations

import errno
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from krita_sdxl.backend.setup.plan.hub import RemoteFile
from krita_sdxl.backend.setup.plan.space import Need, check_space, free_bytes, human

from .plan import hub

Emit = Callable[..., None]  # emit(kind, **fields): one progress event
ATTEMPTS = 5  # per file, each resuming where the last stopped
TIMEOUT_S = 60
EMIT_EVERY_S = 0.25
_CHUNK = 1 << 18


class DownloadFailed(Exception):
    def __init__(self, why: str, what: str) -> None:
        super().__init__(f"{why} {what}")
        self.why = why
        self.what = what


@dataclass
class RepoPlan:
    repo: str
    commit: str
    files: list[RemoteFile]
    missing: list[RemoteFile]  # not complete in the cache
    partial: int  # bytes of them already fetched


# --- listing ------------------------------------------------------------------------------------


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def list_repo(repo: str) -> tuple[str, list[RemoteFile]]:
    """(commit of main, the files to fetch) of ``repo``; DownloadFailed names the reason."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo, revision="main", files_metadata=True)
    except GatedRepoError:
        raise DownloadFailed(
            f"{repo} needs you to accept its licence on the Hugging Face Hub.",
            "Accept it on its page, log in with `hf auth login`, then try again.",
        ) from None
    except RepositoryNotFoundError:
        raise DownloadFailed(f"{repo} was not found at {_endpoint()}.", "Check the name (and HF_ENDPOINT).") from None
    except HfHubHTTPError as exc:
        raise DownloadFailed(f"the Hugging Face Hub ({_endpoint()}) answered {exc}.", "Try again later.") from None
    except Exception as exc:  # connection errors come from httpx or requests, depending on the version
        raise DownloadFailed(
            f"the Hugging Face Hub ({_endpoint()}) could not be reached: {type(exc).__name__}: {exc}.",
            "Check the internet connection (and HTTPS_PROXY behind a proxy), then try again.",
        ) from None
    remote = []
    for s in info.siblings or []:
        if s.size is None:
            raise DownloadFailed(f"{repo}: the Hub listed {s.rfilename} without its size.", "Try again later.")
        lfs = s.lfs
        sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        remote.append(RemoteFile(s.rfilename, int(s.size), sha, s.blob_id))
    if not info.sha:
        raise DownloadFailed(f"{repo}: the Hub did not say which commit main is.", "Try again later.")
    return info.sha, hub.select_files(remote)


def _complete(cache: Path, plan_repo: str, commit: str, file: RemoteFile) -> bool:
    if hub.has_blob(cache, plan_repo, file):
        return True
    pointer = hub.repo_folder(cache, plan_repo) / "snapshots" / commit / file.name
    try:
        return pointer.stat().st_size == file.size  # no symlinks (Windows): the file itself is there
    except OSError:
        return False


def plan_repo(cache: Path, repo: str) -> RepoPlan:
    commit, files = list_repo(repo)
    missing = [f for f in files if not _complete(cache, repo, commit, f)]
    return RepoPlan(repo, commit, files, missing, sum(hub.partial_bytes(cache, repo, f) for f in missing))


# --- transfer -----------------------------------------------------------------------------------


class _DropAuthOnOtherHost(urllib.request.HTTPRedirectHandler):
    """Follow redirects (to a CDN, say) without sending the token there."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlparse(newurl).netloc != urlparse(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _opener() -> urllib.request.OpenerDirector:
    try:
        import certifi  # python.org's macOS Python has no system certificates

        context = ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        context = ssl.create_default_context()
    return urllib.request.build_opener(_DropAuthOnOtherHost(), urllib.request.HTTPSHandler(context=context))


def _headers() -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    return {**build_hf_headers(), "Accept-Encoding": "identity"}


def _hash_prefix(new_hash: Callable[[], Any], partial: Path, have: int) -> Any:
    """A fresh hash fed the first ``have`` bytes already in ``partial`` (a download being continued)."""
    hasher = new_hash()
    with partial.open("rb") as f:
        left = have
        while left and (chunk := f.read(min(_CHUNK, left))):
            hasher.update(chunk)
            left -= len(chunk)
    return hasher


def fetch(
    url: str,
    partial: Path,
    size: int,
    on_bytes: Callable[[int], None],
    new_hash: Callable[[], Any] | None = None,
    headers: dict[str, str] | None = None,
) -> str | None:
    """Fetch ``url`` into ``partial`` until it holds ``size`` bytes, continuing what is there. ``new_hash``
    (a fresh hashlib object each call): every byte of the file goes through it as it is written (the part
    already on disk first), so the download is checked without reading it again; returns its hex digest.
    ``headers``: the request's (default: the Hub's, with its token: give others for any other server)."""
    opener, headers = _opener(), _headers() if headers is None else headers
    partial.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    received = 0
    hasher, hashed = None, -1  # the bytes of the file the hash has seen (-1: none yet)
    while True:
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            partial.unlink()
            if received:  # this very call wrote more than the file holds: not the file expected
                raise DownloadFailed(f"{url} sent more than the {size} bytes expected.",
                                     "It is not the file expected; nothing was kept.")  # fmt: skip
            have = 0
        if new_hash is not None and hashed != have:  # first round, or a write that broke off: from the disk
            hasher, hashed = _hash_prefix(new_hash, partial, have) if have else new_hash(), have
        if have == size:
            return hasher.hexdigest() if hasher is not None else None
        request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={have}-"} if have else {})})
        try:
            with opener.open(request, timeout=TIMEOUT_S) as response:
                if have and response.status != 206:  # the server ignored the range: start over
                    on_bytes(-have)
                    have = 0
                    if new_hash is not None:
                        hasher, hashed = new_hash(), 0
                with partial.open("ab" if have else "wb") as out:
                    while chunk := response.read1(_CHUNK):  # what has arrived: steady progress
                        out.write(chunk)
                        if hasher is not None:
                            hasher.update(chunk)
                            hashed += len(chunk)
                        received += len(chunk)
                        on_bytes(len(chunk))
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # "range not satisfiable": the partial file is wrong
                partial.unlink()
                continue
            why = f"the server answered {exc.code} {exc.reason} for {url}."
            raise DownloadFailed(why, "Try again later.") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            failures.append(f"{type(exc).__name__}: {exc}")
            if len(failures) >= ATTEMPTS:
                how = f"broke off {len(failures)} times" if received else f"failed {len(failures)} times"
                raise DownloadFailed(
                    f"the download of {url} {how} (last: {failures[-1]}).",
                    "Check the internet connection (and HTTPS_PROXY behind a proxy), then try again: it continues "
                    "where it stopped.",
                ) from None
            time.sleep(min(2.0, 0.2 * len(failures)))


class Progress:
    """Counts the bytes fetched and emits ``progress`` events, at most every EMIT_EVERY_S seconds."""

    def __init__(self, emit: Emit, needed: int) -> None:
        self.emit, self.needed, self.done, self._last = emit, needed, 0, 0.0

    def add(self, n: int) -> None:
        self.done = max(0, self.done + n)
        now = time.monotonic()
        if now - self._last >= EMIT_EVERY_S:
            self._last = now
            self.flush()

    def flush(self) -> None:
        self.emit("progress", done=self.done, needed=self.needed)


# --- the whole download -------------------------------------------------------------------------


def _disk_full(cache: Path, done: int, needed: int) -> DownloadFailed:
    return DownloadFailed(
        f"the disk holding the Hugging Face cache ({cache}) is full, after {human(done)} of {human(needed)}.",
        "Free some space (or set HF_HOME to a folder on another disk), then run the setup again: the download "
        "continues where it stopped.",
    )


def _install(cache: Path, rp: RepoPlan, file: RemoteFile, progress: Progress, emit: Emit, check: bool) -> bool:
    """Fetch one file if needed, verify it, move it into place and link it into the snapshot. True when its
    content was checked against its checksum in this run (downloaded now, or ``check``); False: its size only."""
    from huggingface_hub import hf_hub_download, hf_hub_url

    blob = hub.blob(cache, rp.repo, file)
    if file in rp.missing:
        partial = blob.with_name(file.etag + ".incomplete")
        emit("file", name=file.name, size=file.size, resumed=hub.partial_bytes(cache, rp.repo, file))
        url = hf_hub_url(rp.repo, file.name, revision=rp.commit, endpoint=_endpoint())
        digest = fetch(url, partial, file.size, progress.add, lambda: hub.content_hash(file))
        emit("verify", name=file.name)
        problem = hub.digest_problem(file, digest) if digest is not None else hub.verify(partial, file)
        if problem:
            partial.unlink(missing_ok=True)
            raise DownloadFailed(f"the download of {rp.repo} was damaged: {problem}.",
                                 "Run the setup again to fetch that file anew.")  # fmt: skip
        os.replace(partial, blob)
    path = Path(hf_hub_download(rp.repo, file.name, revision=rp.commit, cache_dir=cache))
    linked = path.resolve() == blob.resolve()  # else huggingface_hub fetched it itself, or copied it (no symlinks)
    hashed = file in rp.missing and hub.content_hash(file) is not None
    if (check and file not in rp.missing) or (file in rp.missing and not linked):
        emit("verify", name=file.name)
        problem = hub.verify(path.resolve(), file)
        if problem:  # damaged on disk since: throw it away, the next run fetches it again
            for p in {path, path.resolve()}:
                p.unlink(missing_ok=True)
            raise DownloadFailed(f"{rp.repo} in the cache is damaged: {problem}.",
                                 "Run the setup again to fetch that file anew.")  # fmt: skip
        hashed = hub.content_hash(file) is not None
    return hashed


def download(repos: list[str], emit: Emit, *, verify_all: bool = False, cache: Path | None = None) -> list[Path]:
    """Fetch every repo's files (what is missing), check the disk first; the snapshot folders."""
    cache = hub.hf_cache_dir() if cache is None else cache
    plans = [plan_repo(cache, repo) for repo in repos]
    total = sum(f.size for p in plans for f in p.files)
    needed = sum(f.size for p in plans for f in p.missing) - sum(p.partial for p in plans)
    free = free_bytes(cache)
    emit("plan", repos=repos, files=sum(len(p.files) for p in plans), total=total, needed=needed, free=free,
         cache=str(cache))  # fmt: skip
    problems = check_space([Need(cache, needed, "the models", "set HF_HOME to a folder on another disk")], free_bytes)
    if problems:
        raise DownloadFailed(problems[0], "Nothing was downloaded.")
    progress = Progress(emit, needed)
    snapshots = []
    for rp in plans:
        verified = 0
        for file in rp.files:
            try:
                verified += _install(cache, rp, file, progress, emit, verify_all)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise _disk_full(cache, progress.done, needed) from None
                raise DownloadFailed(f"{rp.repo}: {file.name} could not be written: {exc}.",
                                     "Check the folder's permissions, then try again.") from None  # fmt: skip
        progress.flush()
        refs = hub.repo_folder(cache, rp.repo) / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / "main").write_text(rp.commit, encoding="utf-8")  # what `serve` resolves the repo id with
        snapshot = hub.repo_folder(cache, rp.repo) / "snapshots" / rp.commit
        snapshots.append(snapshot)
        emit("done", repo=rp.repo, snapshot=str(snapshot), files=len(rp.files), verified=verified)
    return snapshots


def describe_check(event: dict[str, Any]) -> str:
    """What a ``done`` event says was checked: "verified" only when every file's checksum was."""
    files, verified = event.get("files", 0), event.get("verified", 0)
    if verified >= files:
        return "verified (every file's checksum)"
    later = "`krita-sdxl setup download --verify` checks their checksums"
    if not verified:
        return f"sizes checked ({later})"
    return f"{verified} files downloaded and verified, {files - verified} already there with sizes checked ({later})"


def describe_plan(event: dict[str, Any]) -> str:
    return (
        f"{event['files']} files, {human(event['total'])} in all; {human(event['needed'])} to download into "
        f"{event['cache']} ({human(event['free'])} free)"
    )
