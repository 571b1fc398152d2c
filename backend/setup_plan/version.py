"""The krita-sdxl version: the backend package, its wheel and the Krita plugin carry the same one.

pyproject.toml reads it from here (``[tool.setuptools.dynamic]``); the service reports it in
``welcome.capabilities.backend_version``; the plugin compares the two on connect.
"""

VERSION = "0.1.0"
