"""Image files for the CLI, at their real depth: 8-bit, 16-bit and float pictures are sent in the
protocol's 8/16-bit uint or 32-bit float frames and written back at that depth.

Grey pictures travel as RGB(A) (the model needs colour channels) and are written back grey.
Pillow reads 16-bit colour PNG/TIFF at 8 bits only; its decoder is run twice here (high bytes, then
low bytes) and Pillow cannot write them at all, so 16-bit colour PNGs are written by ``png16.py``.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from krita_sdxl.backend.common.config import ConfigError
from krita_sdxl.protocol import MAX_SIDE, Image, ImageSpec

from .png16 import encode_png16

_DTYPES = {("uint", 8): np.dtype("u1"), ("uint", 16): np.dtype("<u2"), ("float", 32): np.dtype("<f4")}
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, as Pillow's convert("L")


def describe(spec: ImageSpec, grey: bool, alpha: bool | None = None) -> str:
    """``16-bit colour with alpha``: what a picture holds (``alpha``: as written, when it differs)."""
    depth = "float" if spec.sample == "float" else f"{spec.depth}-bit"
    alpha = spec.has_alpha if alpha is None else alpha
    return f"{depth} {'grey' if grey else 'colour'}{' with alpha' if alpha else ''}"


@dataclass(frozen=True)
class Layout:
    """What a picture file holds, from its header alone (no pixel decoded): the frame it will become."""

    spec: ImageSpec  # the frame's size, channels (RGB or RGBA), depth and sample
    grey: bool
    icc: bytes | None = None

    @property
    def describe(self) -> str:
        return describe(self.spec, self.grey)


@dataclass(frozen=True)
class Picture:
    image: Image  # the frame sent: RGB or RGBA, 8/16-bit uint or 32-bit float
    grey: bool  # the file was grey: the result is written back grey
    icc: bytes | None = None  # the file's colour profile, written back with the result
    notes: tuple[str, ...] = ()  # lines to print (e.g. a depth Pillow could not read)

    @property
    def spec(self) -> ImageSpec:
        return self.image.spec

    @property
    def describe(self) -> str:
        return describe(self.image.spec, self.grey)


@contextmanager
def _sized_by_us() -> Iterator[None]:
    """Pillow's decompression-bomb guard off: the size is checked here, against the protocol's and the
    service's limits, before any pixel is decoded (Pillow would refuse pictures the protocol carries)."""
    from PIL import Image as PILImage

    saved, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved


def _layout_of(im: Any) -> tuple[str, int, bool, bool]:
    """(sample, depth, alpha, grey) of the frame an opened picture becomes, as :func:`_pixels` decodes it."""
    mode, rawmode = im.mode, _tile_rawmode(im) or ""
    if mode in ("RGB", "RGBA") and rawmode[-3:] in ("16B", "16L", "16N"):
        return "uint", 16, rawmode.startswith(("RGBA", "LA")), rawmode.startswith("LA")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return "uint", 16, False, True
    if mode == "F":
        return "float", 32, False, True
    alpha = "A" in mode or "a" in mode or "transparency" in im.info
    return "uint", 8, alpha, mode in ("1", "L", "LA", "La", "I", "F")


_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def peek_picture(path: Path) -> Layout:
    """The picture's size and format from its header (Pillow's lazy open: nothing decoded); ConfigError
    when it cannot be read or is larger than the protocol carries."""
    from PIL import Image as PILImage

    with _read_errors(path), _sized_by_us(), PILImage.open(path) as im:
        width, height = im.size
        header_exif = "exif" in im.info or im.format == "TIFF"  # PNG's getexif() decodes otherwise
        if header_exif and im.getexif().get(0x0112) in _TURNED:
            width, height = height, width
        sample, depth, alpha, grey = _layout_of(im)
        icc = im.info.get("icc_profile")
    if max(width, height) > MAX_SIDE:
        raise ConfigError(
            f"{path} is {width}x{height} pixels; the largest picture the service takes is {MAX_SIDE} px a side: "
            "scale it down, or crop the part to refine"
        )
    return Layout(ImageSpec(width, height, "RGBA" if alpha else "RGB", depth, sample), grey, icc)


def _tile_rawmode(im: Any) -> str | None:
    args = im.tile[0][3] if im.tile else None
    return args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None


def _decode_as(path: Path, rawmode: str) -> np.ndarray:
    """Decode the file's pixels with another raw mode (same bits per pixel): Pillow's own decoder."""
    from PIL import Image as PILImage

    with PILImage.open(path) as im:
        tiles = []
        for tile in im.tile:
            args = tile[3]
            new = rawmode if isinstance(args, str) else (rawmode, *args[1:])
            tiles.append(tile._replace(args=new) if hasattr(tile, "_replace") else (*tile[:3], new))
        im.tile = tiles
        im.load()
        return np.asarray(im)


def _colour16(path: Path, rawmode: str) -> np.ndarray | None:
    """16-bit colour or grey+alpha pixels (H, W, C) as uint16, or None when this Pillow cannot."""
    base, _, order = rawmode.partition(";16")
    big = order == "B" or (order == "N" and sys.byteorder == "big")
    try:
        if base == "LA":  # same 4 bytes per pixel as 8-bit RGBA: the raw bytes
            raw = _decode_as(path, "RGBA").astype(np.uint16)
            hi, lo = (raw[..., 0::2], raw[..., 1::2]) if big else (raw[..., 1::2], raw[..., 0::2])
            return hi * 256 + lo
        if base in ("RGB", "RGBA"):
            first, second = _decode_as(path, f"{base};16B"), _decode_as(path, f"{base};16L")
            hi, lo = (first, second) if big else (second, first)
            return hi.astype(np.uint16) * 256 + lo
    except (OSError, ValueError, KeyError):
        return None
    return None


def _pixels(path: Path) -> tuple[np.ndarray, bool, list[str], bytes | None]:
    """(H x W x C array: uint8, uint16 or float32; grey; notes; ICC profile)."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    notes: list[str] = []
    with PILImage.open(path) as im:
        icc = im.info.get("icc_profile")
        mode, rawmode = im.mode, _tile_rawmode(im) or ""
        if mode in ("RGB", "RGBA") and rawmode[-3:] in ("16B", "16L", "16N"):
            deep = _colour16(path, rawmode)
            if deep is not None:
                return deep, rawmode.startswith("LA"), notes, icc
            notes.append(f"note: this Pillow reads {path.name} (16-bit colour) at 8 bits only")
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            values = np.asarray(im)
            if values.min() < 0 or values.max() > 65535:
                raise ConfigError(f"{path}: 32-bit integer pictures are not supported; save it as 16-bit or float")
            return values.astype(np.uint16)[..., None], True, notes, icc
        if mode == "F":
            return np.asarray(im, dtype=np.float32)[..., None], True, notes, icc
        im = ImageOps.exif_transpose(im)
        has_alpha = "A" in mode or "a" in mode or "transparency" in im.info
        grey = mode in ("1", "L", "LA", "La", "I", "F")
        target = ("LA" if has_alpha else "L") if grey else ("RGBA" if has_alpha else "RGB")
        values = np.asarray(im.convert(target))
        return (values[..., None] if values.ndim == 2 else values), grey, notes, icc


def read_picture(path: Path) -> Picture:
    """The picture in ``path`` as a protocol frame at its own depth; ConfigError when it cannot be read
    (its size is checked from the header first: :func:`peek_picture`)."""
    peek_picture(path)
    with _read_errors(path), _sized_by_us():
        values, grey, notes, icc = _pixels(path)
    if grey:  # colour channels for the model; alpha stays last
        values = np.concatenate([np.repeat(values[..., :1], 3, axis=-1), values[..., 1:]], axis=-1)
    sample, depth = ("float", 32) if values.dtype == np.float32 else ("uint", values.dtype.itemsize * 8)
    h, w, c = values.shape
    spec = ImageSpec(w, h, "RGBA" if c == 4 else "RGB", depth, sample)
    data = np.ascontiguousarray(values, dtype=_DTYPES[(sample, depth)]).tobytes()
    return Picture(Image(spec, data), grey, icc, tuple(notes))


def samples(image: Image) -> np.ndarray:
    """A protocol frame's pixels as (H, W, C) in their own dtype."""
    s = image.spec
    flat = np.frombuffer(memoryview(image.data).cast("B"), dtype=_DTYPES[(s.sample, s.depth)])
    return flat.reshape(s.height, s.width, s.channels)


@dataclass(frozen=True)
class Output:
    """How a result will be written: checked (and a tiny sample encoded) before any work starts."""

    path: Path
    format: str  # Pillow's format name, e.g. PNG
    mode: str  # Pillow mode written, or "png16" for 16-bit colour / grey+alpha PNG
    keep_alpha: bool
    grey: bool
    icc: bytes | None
    note: str | None = None  # printed once: e.g. JPEG drops alpha
    describe: str = ""  # what the file holds, as written ("8-bit colour": a JPEG has no alpha)


PictureLike = Layout | Picture
WRITABLE = (".png", ".tif", ".jpg", ".webp", ".bmp", ".gif")  # offered in messages (any Pillow can write works)


def _mode(picture: PictureLike, keep_alpha: bool) -> str:
    s = picture.spec
    if s.sample == "float":
        return "F" if picture.grey and not keep_alpha else "float colour"
    if s.depth == 16:
        return "I;16" if picture.grey and not keep_alpha else "png16"
    return ("L" if picture.grey else "RGB") + ("A" if keep_alpha else "")


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")


def plan_output(name: Path | str, picture: PictureLike, source: Path | None = None) -> Output:
    """Check the output file name (as typed) against the result it will hold; ConfigError says what to change."""
    from PIL import Image as PILImage

    text, path = str(name), Path(name).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise ConfigError(f"-o {text} is a folder; give a file name in it, such as {path / 'refined.png'}")
    ext = path.suffix.lower()
    if not ext:
        raise ConfigError(f"-o {text} has no file extension; add one, such as {text}.png")
    fmt = PILImage.registered_extensions().get(ext)
    if fmt is None or fmt not in PILImage.SAVE:
        offered = [e for e in WRITABLE if PILImage.registered_extensions().get(e) in PILImage.SAVE]
        raise ConfigError(f"-o {text}: cannot write {ext} files; use {', '.join(offered[:-1])} or {offered[-1]}")
    if source is not None and path.exists() and path.resolve() == source.resolve():
        raise ConfigError(f"-o {text} is the input picture; write the result to another file")
    anchor = _nearest_existing(path.parent)
    if not anchor.is_dir():
        raise ConfigError(f"-o {text}: {anchor} is a file, so no folder can be made there")
    if not os.access(anchor, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"-o {text}: permission denied (cannot write in {anchor})")
    spec = picture.spec
    keep_alpha, note = spec.has_alpha, None
    if keep_alpha and fmt == "JPEG":
        keep_alpha, note = False, f"note: JPEG has no alpha channel; {path.name} is written without it"
    mode = _mode(picture, keep_alpha)
    out = Output(path, fmt, mode, keep_alpha, picture.grey, picture.icc, note, describe(spec, picture.grey, keep_alpha))
    try:
        _encode(out, np.zeros((2, 2, 4), _DTYPES[(spec.sample, spec.depth)]))
    except (OSError, ValueError, KeyError, TypeError):
        need = ".tif" if spec.sample == "float" else ".png"
        raise ConfigError(f"-o {text}: {fmt} files cannot hold this {picture.describe} result; use {need}") from None
    return out


def _finish(values: np.ndarray, out: Output) -> np.ndarray:
    """RGB(A) result -> what is written: grey again, alpha dropped when the format has none."""
    colour, alpha = values[..., :3], values[..., 3:] if out.keep_alpha else values[..., :0]
    if out.grey:
        luma = colour.astype(np.float64) @ _GREY_WEIGHTS
        if values.dtype != np.float32:
            luma = np.clip(np.rint(luma), 0, np.iinfo(values.dtype).max)
        colour = luma.astype(values.dtype)[..., None]
    return np.concatenate([colour, alpha], axis=-1)


def _encode(out: Output, values: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    pixels = _finish(values, out)
    if out.mode == "png16":
        if out.format != "PNG":
            raise ValueError("16-bit colour is written as PNG only")
        return encode_png16(pixels.astype(np.uint16), out.icc)
    if out.mode == "float colour":
        raise ValueError("Pillow cannot write float colour pictures")
    plane = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    if out.mode == "I;16":
        im = PILImage.fromarray(plane.astype(np.uint16))
    else:
        im = PILImage.fromarray(np.ascontiguousarray(plane), out.mode)
    buf = io.BytesIO()
    extra = {"icc_profile": out.icc} if out.icc and out.format in ("PNG", "JPEG", "TIFF", "WEBP") else {}
    im.save(buf, format=out.format, **extra)
    return buf.getvalue()


def write_picture(out: Output, result: Image) -> None:
    """Write the result as planned; the file appears whole or not at all (OSError when it cannot)."""
    data = _encode(out, samples(result))
    from krita_sdxl.backend.common.safe_files import write_atomic

    out.path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.path, data)


def keep_somewhere(out: Output, result: Image, job: str) -> Path:
    """When the planned file cannot be written after the job ran: keep the result in the temp folder."""
    import tempfile

    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in job)[-60:]
    fallback = Path(tempfile.gettempdir()) / f"krita-sdxl-{safe}{out.path.suffix}"
    write_picture(replace(out, path=fallback), result)
    return fallback


@contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """An image file that cannot be read becomes a ConfigError naming it (one wording for peek and read)."""
    try:
        yield
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give an image file") from None
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow: UnidentifiedImageError is an OSError
        raise ConfigError(f"cannot read {path}: {exc}") from None
