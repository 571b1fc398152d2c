"""Size buckets for the speed path's ``whole`` scope (static shapes): few shapes, so few compilations.

The default ``regional`` scope compiles with symbolic sizes and needs no buckets (it pads to 64 px only).

A compiled UNet (and each CUDA graph it records) is specialised to the shapes it has seen. Selections in
Krita come in any size, so the speed path pads every work image up to one of a small set of bucket sizes
(mirrored padding, cropped off after decoding) instead of running it at its own size. Each side is mapped
independently to the smallest ladder rung that holds it:

    256, 384, ..., 1280 (steps of 128 px = 16 latents), then 1536, 1792, 2048 (steps of 256 px)

and beyond the ladder to a multiple of ``beyond`` (256 px). Every bucket is a multiple of 64 px, what the
SDXL UNet needs (latent divisible by 8 for its three downsamples). The padding wasted is at most 128 px a
side up to 1280 px (11% of area at 1152 px) and at most 256 px beyond. With a 12-rung ladder there are at
most 144 bucket shapes in 256..2048 px, and a typical Krita work area (640 to 1280 px a side, about 1 MP)
touches at most 36, in practice about ten (the aspect ratios people select). With static shapes (the speed
path's default) each bucket is one compilation, once per machine thanks to the compile cache; with dynamic
spatial dimensions a new bucket costs only a CUDA-graph recording.

Pure Python, no torch or numpy: the policy is unit-tested on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

UNET_MULTIPLE = 64  # px: 8 (VAE) x 2^3 (UNet downsamples)
DEFAULT_LADDER: tuple[int, ...] = (256, 384, 512, 640, 768, 896, 1024, 1152, 1280, 1536, 1792, 2048)


@dataclass(frozen=True)
class BucketPolicy:
    ladder: tuple[int, ...] = DEFAULT_LADDER
    beyond: int = 256  # past the ladder's top: round each side up to a multiple of this

    def __post_init__(self) -> None:
        if not self.ladder or list(self.ladder) != sorted(set(self.ladder)):
            raise ValueError(f"ladder must be strictly increasing and non-empty, got {self.ladder}")
        bad = [s for s in (*self.ladder, self.beyond) if s <= 0 or s % UNET_MULTIPLE]
        if bad:
            raise ValueError(f"bucket sides must be positive multiples of {UNET_MULTIPLE} px, got {bad}")

    def side(self, n: int) -> int:
        """The bucket side (px) for an image side of ``n`` px: the smallest rung >= n."""
        if n <= 0:
            raise ValueError(f"image side must be positive, got {n}")
        for rung in self.ladder:
            if n <= rung:
                return rung
        return -(-n // self.beyond) * self.beyond

    def bucket(self, width: int, height: int) -> tuple[int, int]:
        """(bucket width, bucket height) in px for a work image of ``width`` x ``height``."""
        return self.side(width), self.side(height)

    def shapes(self, sizes: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
        """The distinct buckets a set of (width, height) work sizes lands in."""
        return {self.bucket(w, h) for w, h in sizes}

    def waste(self, width: int, height: int) -> float:
        """Fraction of the bucket's pixels that are padding."""
        bw, bh = self.bucket(width, height)
        return 1.0 - (width * height) / (bw * bh)


DEFAULT_POLICY = BucketPolicy()
