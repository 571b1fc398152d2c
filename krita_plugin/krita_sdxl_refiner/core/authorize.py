"""The ``krita-sdxl authorize ...`` line the docker shows for this computer's public key, quoted for a shell.

Z85 keys hold ``* ? ( ) & < > # $ ! { } [ ]``: unquoted, a shell expands or redirects them. The backend
quotes the line it prints by the same rule (``shlex.join``); the plugin cannot import the backend, so the
rule is mirrored here and ``tests/test_plugin_authorize.py`` checks that both give the same line and that
it runs as pasted.
"""

from __future__ import annotations

import shlex

KEYS_FOLDER = "AUTHORIZED_KEYS_FOLDER"  # stands for the folder given to `krita-sdxl serve --authorized-keys`


def authorize_command(public_key: str, keys_folder: str = KEYS_FOLDER) -> str:
    """``krita-sdxl authorize '<key>' --dir <folder>``, each argument quoted for POSIX shells (and PowerShell)."""
    return shlex.join(["krita-sdxl", "authorize", public_key, "--dir", keys_folder])
