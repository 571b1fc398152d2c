"""Shared fixtures: a private krita-sdxl cache and the tiny offline demo models built into it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def krita_sdxl_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and any subprocess it starts) uses a private KRITA_SDXL_CACHE, never ~/.cache."""
    cache = tmp_path_factory.mktemp("krita-sdxl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KRITA_SDXL_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def demo_models(krita_sdxl_cache: Path):  # -> krita_sdxl.backend.models.demo.DemoPaths
    """The demo refiner and base folders, built once per test session into the private cache."""
    from krita_sdxl.backend.models.demo import ensure_demo_models

    return ensure_demo_models(krita_sdxl_cache)


@pytest.fixture(scope="session")
def demo_refiner_path(demo_models) -> Path:
    return demo_models.refiner


@pytest.fixture(scope="module")
def app():
    """The offscreen QApplication of the plugin tests (QT_QPA_PLATFORM=offscreen is set by them)."""
    from PyQt5.QtWidgets import QApplication

    return QApplication.instance() or QApplication([])


@pytest.fixture
def ctx() -> Iterator[object]:
    """A private ZeroMQ context, destroyed after the test."""
    import zmq

    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


@pytest.fixture
def make_ctx() -> Iterator[Callable[[], object]]:
    """More private ZeroMQ contexts (a CURVE service needs its own, apart from its clients'), all destroyed
    after the test: a context left to the garbage collector can block in term() inside a later test."""
    import zmq

    made: list[zmq.Context] = []

    def make() -> zmq.Context:
        made.append(zmq.Context())
        return made[-1]

    try:
        yield make
    finally:
        for context in made:
            context.destroy(linger=0)
