"""Download an upscaler model file (``krita-sdxl setup upscaler``): resumable, size and SHA-256 checked.

The bytes come through :func:`.download.fetch` (HTTP Range requests continue a broken or cancelled
download from ``NAME.incomplete``) with plain headers: no Hugging Face token goes to another server.
The file is moved into place only once its SHA-256 is the published one; a file already in place is
checked again and kept. Progress goes out as the model download's events (``setup.plan.events``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from krita_sdxl.backend.setup.plan.space import Need, check_space, free_bytes
from krita_sdxl.backend.setup.plan.upscalers import UpscalerFile
from krita_sdxl.backend.setup.plan.version import VERSION

from .download import DownloadFailed, Emit, Progress, fetch

HEADERS = {"Accept-Encoding": "identity", "User-Agent": f"krita-sdxl/{VERSION}"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_upscaler(file: UpscalerFile, folder: Path, emit: Emit) -> Path:
    """``file`` in ``folder`` (made if missing), verified; DownloadFailed says why and what to do."""
    folder.mkdir(parents=True, exist_ok=True)
    target, partial = folder / file.name, folder / (file.name + ".incomplete")
    if target.is_file() and target.stat().st_size == file.size and sha256_of(target) == file.sha256:
        emit("plan", repos=[file.url], files=1, total=file.size, needed=0, free=free_bytes(folder), cache=str(folder))
        emit("done", repo=file.title, snapshot=str(target))
        return target
    have = partial.stat().st_size if partial.is_file() else 0
    needed = file.size - min(have, file.size)
    free = free_bytes(folder)
    emit("plan", repos=[file.url], files=1, total=file.size, needed=needed, free=free, cache=str(folder))
    problems = check_space([Need(folder, needed, file.title, "free some space, or pick another setup folder")],
                           free_bytes)  # fmt: skip
    if problems:
        raise DownloadFailed(problems[0], "Nothing was downloaded.")
    emit("file", name=file.name, size=file.size, resumed=have)
    progress = Progress(emit, needed)
    got = fetch(file.url, partial, file.size, progress.add, new_hash=hashlib.sha256, headers=HEADERS)
    progress.flush()
    emit("verify", name=file.name)  # hashed as it was written: no second read
    if got != file.sha256:
        partial.unlink(missing_ok=True)
        raise DownloadFailed(
            f"the download of {file.name} was damaged: its SHA-256 is {got}, the published one {file.sha256}.",
            "Run it again to fetch the file anew.",
        )
    os.replace(partial, target)
    emit("done", repo=file.title, snapshot=str(target))
    return target
