"""Setting up a machine to serve: the pure plan (``plan/``: standard library only, vendored into the Krita plugin)
and the model download (``download``). Imports nothing above :mod:`krita_sdxl.backend.common`.

This ``__init__`` must stay empty of imports: the plugin imports ``setup.plan`` inside Krita."""
