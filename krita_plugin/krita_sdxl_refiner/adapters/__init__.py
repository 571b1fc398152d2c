"""The thin adapters to the outside world, each behind a port the workflow defines in ``core``: the Krita
document (``krita_adapter``), the ZeroMQ connection on Qt's event loop (``client``), the local backend and
the setup's programs (QProcess), Qt timers, QImages and the CURVE key files.

May import: ``core``, PyQt5, krita, zmq, ``krita_sdxl.protocol`` and ``krita_sdxl.backend.setup.plan``. Never
``workflow`` or ``ui`` (checked by ``lint-imports``).
"""
