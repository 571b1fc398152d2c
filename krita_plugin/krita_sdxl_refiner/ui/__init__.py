"""The docker's Qt widgets: the panel, its advanced settings, the queue and results, the connection dialog and
its Set up section. They show the workflow's state and call its methods (buttons through ``slots.on_click``).

May import: ``workflow``, ``core``, ``adapters``, PyQt5, ``krita_sdxl.protocol`` and
``krita_sdxl.backend.setup.plan``. Never krita (checked by ``lint-imports``).
"""
