"""SDXL Refiner for Krita: refine a selection or layer with a local (or LAN) krita-sdxl backend.

Inside Krita this registers the plugin; elsewhere (unit tests) importing the package does nothing,
so its pure modules can be tested without Krita.
"""

import importlib.util

if importlib.util.find_spec("krita") is not None:
    from .plugin import register

    register()
