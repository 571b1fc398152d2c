"""The ``krita-sdxl authorize`` command line a client shows for its CURVE public key, quoted for a shell.

Z85 keys hold ``* ? ( ) & < > # $ ! { } [ ]``: unquoted, a shell expands or redirects them. Every
place that prints the line (the CLI, the service's messages, the Krita docker) builds it here.
"""

from __future__ import annotations

import shlex

KEYS_FOLDER = "AUTHORIZED_KEYS_FOLDER"  # stands for the folder given to `krita-sdxl serve --authorized-keys`


def authorize_command(public_key: str, keys_folder: str = KEYS_FOLDER) -> str:
    """``krita-sdxl authorize '<key>' --dir <folder>``, each argument quoted for POSIX shells and PowerShell."""
    return shlex.join(["krita-sdxl", "authorize", public_key, "--dir", keys_folder])
