"""The plugin's pure core: job records, the results history, the refine plan, settings, pixel formats,
thumbnails, the ports the workflow talks through (document, connection, processes, timers) and a small
Qt-like :class:`~.signals.Signal`.

May import: the standard library, ``krita_sdxl.protocol`` and ``krita_sdxl.backend.setup.plan``. Never PyQt5,
krita or zmq, nor any other package of the plugin (checked by ``lint-imports``; typed with pyright).
"""
