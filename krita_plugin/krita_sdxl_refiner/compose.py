"""The composition root: builds the adapters (ZeroMQ client, local backend, processes, timers, a worker
thread, pictures, key files, the application data folder) and hands them to the workflow. ``plugin.py``
(in Krita) and the tests build the controller here, so both are wired the same way. No krita import: it
runs in tests too."""

from __future__ import annotations

from pathlib import Path

from PyQt5.QtCore import QStandardPaths

from .adapters import keys
from .adapters.backend import Backend
from .adapters.background import QtBackground
from .adapters.buffers import QtPictures
from .adapters.client import Client
from .adapters.setup_probe import QtProcesses
from .adapters.timers import QtTimers
from .core import settings as settings_mod
from .core.connection import Connection
from .core.document import Adapter
from .core.live_port import LivePort
from .workflow.controller import Controller, curve_of
from .workflow.live import LiveRefine


def app_data() -> Path:
    """Krita's application data folder (``%APPDATA%\\krita``, ``~/.local/share/krita``, ...)."""
    return Path(QStandardPaths.writableLocation(QStandardPaths.AppDataLocation))


def build_controller(adapter: Adapter, client: Connection | None = None, live: LivePort | None = None) -> Controller:
    """The controller on ``adapter``, with Qt's adapters. ``client``: an already made connection (tests
    give one with short timeouts); by default a :class:`Client` to the endpoint and keys in the settings.
    ``live``: the live document port (Krita's, or a test's): live refine is attached to the controller."""
    if client is None:
        stored = settings_mod.load(adapter.read_setting)
        client = Client(stored.endpoint, curve=curve_of(stored))
    timers = QtTimers()
    controller = Controller(
        adapter,
        client=client,
        backend=Backend(),
        processes=QtProcesses(),
        timers=timers,
        pictures=QtPictures(),
        keys=keys,
        app_data=app_data(),
        background=QtBackground(),
    )
    if live is not None:
        controller.live = LiveRefine(controller, live, timers)
    return controller
