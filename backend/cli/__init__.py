"""The command line, ``krita-sdxl``: ``main`` builds the parsers and runs a command; one module per command
(``refine``, ``demo``, ``setup``) and for what they share: the settings table (``options``, ``job_options``),
image files (``imageio``, ``png16``), checks before loading (``preflight``), the blocking client (``client``) and
a service in a subprocess (``launcher``). ``python -m krita_sdxl.backend.cli`` runs it too.

The top layer: may use everything below it (pool, service, engine, speed, models, setup, common)."""
