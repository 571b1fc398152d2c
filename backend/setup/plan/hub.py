"""The models the setup fetches, which of their files, and the Hugging Face cache they land in.

The layout is huggingface_hub's (``HF_HUB_CACHE/models--ORG--NAME/{blobs,snapshots/COMMIT,refs/main}``);
a blob is named by its ETag: the SHA-256 of the content for files kept in Git LFS (the weights), the
git blob SHA-1 for the others. So a finished download is checked against its name, and an unfinished
one is ``blobs/ETAG.incomplete``, which huggingface_hub resumes with an HTTP Range request.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFINER_REPO = "stabilityai/stable-diffusion-xl-refiner-1.0"
BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
# What a diffusers pipeline folder needs: configs and tokenizer files, and one set of component
# weights: the fp16 variant when the repo has it (half the download, fine for every dtype), else the
# plain files. Never the single-file checkpoint at the top of the repo.
META_PATTERNS = ("*.json", "*.txt")
FP16_WEIGHTS = ("*/*.fp16.safetensors",)
PLAIN_WEIGHTS = ("*/*.safetensors",)
FP16_PATTERNS = [*META_PATTERNS, *FP16_WEIGHTS]
PLAIN_PATTERNS = [*META_PATTERNS, *PLAIN_WEIGHTS]
CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    role: str  # refiner, base
    repo: str
    approx_bytes: int  # the fp16 files, for the plan shown before anything is fetched
    title: str


REFINER = ModelSpec("refiner", REFINER_REPO, 6_080_000_000, "SDXL 1.0 refiner")
BASE = ModelSpec("base", BASE_REPO, 6_940_000_000, "SDXL 1.0 base (Generate and Two-stage modes)")


def models(include_base: bool) -> tuple[ModelSpec, ...]:
    return (REFINER, BASE) if include_base else (REFINER,)


@dataclass(frozen=True)
class RemoteFile:
    name: str  # path in the repo
    size: int
    sha256: str | None = None  # Git LFS files: the content's SHA-256
    blob_id: str | None = None  # the git blob SHA-1 (every file)

    @property
    def etag(self) -> str:
        """The blob's name in the cache (what the Hub sends as ETag)."""
        return self.sha256 or self.blob_id or ""


def select_files(files: Iterable[RemoteFile]) -> list[RemoteFile]:
    """The files of a diffusers repo to fetch (see the patterns above), sorted by name."""
    files = list(files)

    def matching(patterns: Iterable[str]) -> list[RemoteFile]:
        return [f for f in files if any(fnmatch.fnmatchcase(f.name, p) for p in patterns)]

    weights = matching(FP16_WEIGHTS) or matching(PLAIN_WEIGHTS)
    chosen = {f.name: f for f in [*matching(META_PATTERNS), *weights]}
    return [chosen[name] for name in sorted(chosen)]


def hf_cache_dir(env: Mapping[str, str] | None = None, home: str | None = None) -> Path:
    """The Hugging Face hub cache as huggingface_hub finds it: HF_HUB_CACHE (or the old
    HUGGINGFACE_HUB_CACHE), else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub (on every platform)."""
    env = os.environ if env is None else env
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(os.path.expandvars(cache)).expanduser()
    hf_home = env.get("HF_HOME")
    if hf_home:
        return Path(os.path.expandvars(hf_home)).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(home if home is not None else os.path.expanduser("~")) / ".cache"
    return base / "huggingface" / "hub"


def repo_folder(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def blob(cache: Path, repo: str, file: RemoteFile) -> Path:
    return repo_folder(cache, repo) / "blobs" / file.etag


def partial_bytes(cache: Path, repo: str, file: RemoteFile) -> int:
    """Bytes of an unfinished download of ``file`` (0 when none)."""
    try:
        return (blob(cache, repo, file).with_name(file.etag + ".incomplete")).stat().st_size
    except OSError:
        return 0


def has_blob(cache: Path, repo: str, file: RemoteFile) -> bool:
    """The finished blob is there with the right size (its content is checked by :func:`verify`)."""
    try:
        return blob(cache, repo, file).stat().st_size == file.size
    except OSError:
        return False


def snapshot_ready(cache: Path, repo: str) -> bool:
    """A quick look, for the plan shown before anything runs: ``refs/main`` names a snapshot that has
    model_index.json and weights in unet/ and vae/. (The download step checks every file.)"""
    folder = repo_folder(cache, repo)
    try:
        commit = (folder / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        return False
    snap = folder / "snapshots" / commit
    if not commit or not (snap / "model_index.json").is_file():
        return False
    return all(any(p.is_file() for p in (snap / part).glob("*.safetensors")) for part in ("unet", "vae"))


def content_hash(file: RemoteFile) -> Any:
    """A fresh hash of what ``file`` is checked with (feed it the content): SHA-256 for Git LFS files, git's
    blob SHA-1 (its ``blob SIZE\\0`` header included) for the others; None when the Hub gave neither."""
    if file.sha256:
        return hashlib.sha256()
    if file.blob_id:
        return hashlib.sha1(f"blob {file.size}\0".encode())
    return None


def digest_problem(file: RemoteFile, digest: str) -> str | None:
    """None when ``digest`` (of :func:`content_hash`) is the file's; else why not."""
    if file.sha256:
        return None if digest == file.sha256 else f"{file.name}: SHA-256 {digest} downloaded, {file.sha256} expected"
    if file.blob_id and digest != file.blob_id:
        return f"{file.name}: git SHA-1 {digest} downloaded, {file.blob_id} expected"
    return None


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def verify(path: Path, file: RemoteFile, progress: Callable[[int], None] | None = None) -> str | None:
    """None when ``path`` holds exactly ``file`` (size, then SHA-256 or the git blob SHA-1); else why not."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"{file.name}: cannot be read ({exc.strerror or exc})"
    if size != file.size:
        return f"{file.name}: {size} bytes on disk, {file.size} expected"
    if file.sha256:
        digest = sha256_file(path, progress)
        if digest != file.sha256:
            return f"{file.name}: SHA-256 {digest} on disk, {file.sha256} expected"
    elif file.blob_id:
        digest = git_blob_sha1(path)
        if digest != file.blob_id:
            return f"{file.name}: git SHA-1 {digest} on disk, {file.blob_id} expected"
    return None
