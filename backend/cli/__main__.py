"""``python -m krita_sdxl.backend.cli``: the same command as ``krita-sdxl`` (how the plugin starts a backend)."""

import sys

from .main import main

sys.exit(main())
