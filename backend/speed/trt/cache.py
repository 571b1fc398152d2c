"""TensorRT engines on disk: one file per (model, weights, size bucket, precision, TensorRT, GPU).

An engine only runs on the TensorRT version and the GPU (name and compute capability) that built it,
for the exact weights and input shapes it was built from. :class:`EngineKey` holds all of these; its
digest names the file, so a change to any of them looks up another file (the old one is simply never
read again; :meth:`EngineCache.prune` removes engines of other versions or GPUs). Each file holds a
header (the key, the payload's length and SHA-256) before the serialized engine, and a file whose
header or payload does not match is ignored (and removed), so the engine is built again. Files are
written to a temporary name and renamed, so a reader never sees half a file, even if the writer dies.

Pure Python and files: no torch, no TensorRT. Tested on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"KRITA-SDXL-TRT\x01"
SUFFIX = ".engine"
MAX_HEADER = 64 * 1024


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on."""

    model: str  # the model's identity (its path or repo id, and the UNet's class)
    weights: str  # a hash of the UNet's weights (backend/speed/trt/unet.py: weights_fingerprint)
    width: int  # the size bucket, px
    height: int
    batch: int  # 2 with classifier-free guidance, 1 without
    precision: str  # "fp16"
    tensorrt: str  # TensorRT's version
    gpu: str  # the GPU's name
    capability: str  # its compute capability, "9.0"
    text_tokens: int = 77  # the prompt embeddings' length
    text_dim: int = 1280  # their width (the UNet's cross_attention_dim)
    extra: str = ""  # anything else that changes the engine (builder settings)

    @property
    def bucket(self) -> tuple[int, int]:
        return (self.width, self.height)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    def filename(self) -> str:
        return f"unet-{self.width}x{self.height}-b{self.batch}-{self.precision}-{self.digest()}{SUFFIX}"

    def same_runtime(self, other: EngineKey) -> bool:
        return (self.tensorrt, self.gpu, self.capability) == (other.tensorrt, other.gpu, other.capability)


class EngineCache:
    """A folder of engine files."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).expanduser()

    def path(self, key: EngineKey) -> Path:
        return self.folder / key.filename()

    def load(self, key: EngineKey) -> bytes | None:
        """The engine for ``key``, or None when there is none or its file is not sound (then it is
        removed, so it is built again)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("TensorRT engine %s cannot be read (%s); building it again", path.name, exc)
            return None
        payload, problem = _unpack(data, key)
        if problem is not None:
            log.warning("TensorRT engine %s is not usable (%s); removing it and building it again", path.name, problem)
            self._remove(path)
            return None
        return payload

    def save(self, key: EngineKey, payload: bytes) -> Path:
        """Write atomically (a temporary file in the same folder, then a rename)."""
        if not payload:
            raise ValueError("an empty engine cannot be cached")
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_pack(key, payload))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            self._remove(Path(tmp))
            raise
        return path

    def entries(self) -> list[tuple[Path, EngineKey | None]]:
        """Every engine file with its key (None: unreadable header)."""
        out: list[tuple[Path, EngineKey | None]] = []
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            try:
                with open(path, "rb") as f:
                    head = f.read(len(MAGIC) + 4 + MAX_HEADER)
                out.append((path, _header_key(head)))
            except (OSError, ValueError):
                out.append((path, None))
        return out

    def prune(self, current: EngineKey) -> list[Path]:
        """Remove engines another TensorRT version or GPU built, unreadable ones and stale temporary
        files; returns what was removed."""
        removed = []
        for path, key in self.entries():
            if key is None or not key.same_runtime(current):
                self._remove(path)
                removed.append(path)
        for tmp in self.folder.glob(f".*{SUFFIX}.*.tmp"):
            self._remove(tmp)
            removed.append(tmp)
        return removed

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass


def _pack(key: EngineKey, payload: bytes) -> bytes:
    header = json.dumps(
        {"key": asdict(key), "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}, sort_keys=True
    ).encode()
    return MAGIC + len(header).to_bytes(4, "big") + header + payload


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    if not data.startswith(MAGIC):
        raise ValueError("not a krita-sdxl engine file")
    start = len(MAGIC) + 4
    size = int.from_bytes(data[len(MAGIC) : start], "big")
    if size > MAX_HEADER or len(data) < start + size:
        raise ValueError("truncated header")
    try:
        header = json.loads(data[start : start + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"bad header: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("bad header")
    return header, start + size


def _header_key(data: bytes) -> EngineKey:
    header, _ = _read_header(data)
    try:
        return EngineKey(**header["key"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"bad key: {exc}") from None


def _unpack(data: bytes, key: EngineKey) -> tuple[bytes, str | None]:
    try:
        header, start = _read_header(data)
        stored = EngineKey(**header["key"])
    except (ValueError, KeyError, TypeError) as exc:
        return b"", str(exc)
    if stored != key:
        return b"", "it was built for another model, size or GPU"
    payload = data[start:]
    if len(payload) != header.get("size"):
        return b"", f"truncated: {len(payload)} of {header.get('size')} bytes"
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        return b"", "checksum mismatch"
    return payload, None


__all__ = ["EngineCache", "EngineKey"]
