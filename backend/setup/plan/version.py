"""The krita-sdxl version: the backend package, its wheel and the Krita plugin carry the same one.

pyproject.toml reads it from here (``[tool.setuptools.dynamic]``); the service reports it in
``welcome.capabilities.backend_version``; the plugin compares the two on connect.
"""

VERSION = "0.1.0"


def mismatch(backend_version: object) -> str | None:
    """What to tell the person when the connected backend (``welcome.capabilities.backend_version``) is
    not this plugin's version; None when it is."""
    if backend_version == VERSION:
        return None
    have = f"version {backend_version}" if isinstance(backend_version, str) else "an older version"
    return (
        f"The backend is {have}, this plugin {VERSION}: update the backend (⚙ → Set up → Update, or "
        f"pip install the krita-sdxl {VERSION} wheel where it runs)."
    )
