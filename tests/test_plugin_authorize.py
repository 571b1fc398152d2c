"""The ``krita-sdxl authorize ...`` line the docker shows: pasted into a shell as it is, it makes the real
``krita-sdxl authorize`` store exactly the docker's key, for keys holding every character a shell treats
specially (Z85 has ``* ? ( ) & < > # $ ! { } [ ]``). The backend quotes the line it prints by the same
rule: both build it with ``krita_sdxl.protocol.authorize`` (the protocol package, which the plugin ships)."""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth
from zmq.utils import z85

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "krita_plugin"))

from krita_sdxl.protocol.authorize import KEYS_FOLDER, authorize_command

SPECIAL = set("*?()&<>#$!{}[]")  # what sh would expand, redirect, run or cut at


def special_keys() -> list[str]:
    """Real 40-character Z85 keys (of 32 random bytes, fixed seed) that hold every special character
    between them."""
    rng = random.Random(21)
    keys: list[str] = []
    missing = set(SPECIAL)
    while missing:
        key = z85.encode(bytes(rng.getrandbits(8) for _ in range(32))).decode()
        if set(key) & missing:
            keys.append(key)
            missing -= set(key)
    return keys


KEYS = special_keys()


def shell(line: str, folder: Path) -> subprocess.CompletedProcess:
    """Run ``line`` as a person pastes it into sh, with the folder put in for AUTHORIZED_KEYS_FOLDER and a
    ``krita-sdxl`` command on PATH."""
    path = f"{command_dir(folder.parent)}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["sh", "-c", pasteable(line, folder)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": path},
    )


def pasteable(line: str, folder: Path) -> str:
    return line.replace(KEYS_FOLDER, shlex.quote(str(folder)))


def command_dir(tmp_path: Path) -> Path:
    """A folder with a ``krita-sdxl`` command that runs this checkout's CLI."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    command = bin_dir / "krita-sdxl"
    command.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m krita_sdxl.backend.cli "$@"\n')
    command.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("key", KEYS)
def test_the_docker_line_pasted_into_a_shell_authorizes_exactly_that_key(key: str, tmp_path: Path) -> None:
    assert len(key) == 40 and set(key) & SPECIAL
    line = authorize_command(key)
    assert shlex.split(line) == ["krita-sdxl", "authorize", key, "--dir", KEYS_FOLDER]
    folder = tmp_path / "clients"
    done = shell(line, folder)
    assert done.returncode == 0, done.stderr
    (stored,) = folder.glob("*.key")
    assert zmq.auth.load_certificate(str(stored))[0].decode() == key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "clients"]  # nothing redirected into a file


def test_the_unquoted_line_of_the_old_docker_breaks_in_a_shell(tmp_path: Path) -> None:
    """Why the quoting: the same key, unquoted, is not what reaches the command."""
    key = KEYS[0]
    done = shell(f"krita-sdxl authorize {key} --dir {KEYS_FOLDER}", tmp_path / "clients")
    stored = list((tmp_path / "clients").glob("*.key")) if (tmp_path / "clients").exists() else []
    assert done.returncode != 0 or not stored or zmq.auth.load_certificate(str(stored[0]))[0].decode() != key


def test_a_folder_with_spaces_is_quoted_too() -> None:
    assert authorize_command("k" * 40, "/srv/krita keys") == f"krita-sdxl authorize {'k' * 40} --dir '/srv/krita keys'"
