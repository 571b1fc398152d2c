"""Benchmark-only engine: returns the input pixels untouched, so the protocol and the service
can be timed without a model (``krita-sdxl serve --identity``)."""

from __future__ import annotations

from typing import Any

from krita_sdxl.protocol import PROTOCOL_VERSION, Image

from .request import ProgressFn, RefineRequest, StopFn


class IdentityEngine:
    def describe(self) -> dict[str, Any]:
        return {
            "device": "none",
            "dtype": "none",
            "models": [{"role": "identity", "name": "identity (benchmark)", "path": None}],
            "modes": ["refine"],
            "protocol_version": PROTOCOL_VERSION,
        }

    def refine(self, req: RefineRequest, on_progress: ProgressFn, should_stop: StopFn) -> Image:
        return req.image
