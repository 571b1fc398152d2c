"""``krita-sdxl keys`` and ``authorize`` as typed, and ``info``/``refine`` against a real CURVE service."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import zmq.auth
from cli_helpers import COMMAND, assert_refused, krita_sdxl, rgba_picture
from PIL import Image as PILImage

from krita_sdxl.backend.cli.launcher import start_service
from krita_sdxl.protocol import PROTOCOL_VERSION
from krita_sdxl.protocol.authorize import authorize_command


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_keys_are_private_and_never_silently_replaced(tmp_path):
    folder = tmp_path / "keys"
    made = krita_sdxl("keys", "--dir", str(folder), "--name", "server")
    assert made.returncode == 0, made.stderr
    public, secret = folder / "server.key", folder / "server.key_secret"
    assert (mode(folder), mode(secret), mode(public)) == (0o700, 0o600, 0o644)
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert sec and zmq.auth.load_certificate(str(public)) == (pub, None)
    assert pub.decode() in made.stdout
    before = secret.read_bytes(), public.read_bytes()
    again = krita_sdxl("keys", "--dir", str(folder), "--name", "server")
    assert_refused(again, 2, "already exists", "--force")
    assert (secret.read_bytes(), public.read_bytes()) == before
    forced = krita_sdxl("keys", "--dir", str(folder), "--name", "server", "--force")
    assert forced.returncode == 0, forced.stderr
    assert zmq.auth.load_certificate(str(secret))[0] != pub and mode(secret) == 0o600


def test_a_planted_link_is_not_written_through(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    (folder / "server.key_secret").symlink_to(target)
    assert_refused(krita_sdxl("keys", "--dir", str(folder)), 2, "already exists")
    assert krita_sdxl("keys", "--dir", str(folder), "--force").returncode == 0
    assert not target.exists()  # the link was replaced, not followed
    secret = folder / "server.key_secret"
    assert stat.S_ISREG(os.lstat(secret).st_mode) and mode(secret) == 0o600


def in_a_shell(line: str) -> subprocess.CompletedProcess:
    """``line`` pasted into bash, with this environment's krita-sdxl first on PATH."""
    path = f"{Path(COMMAND[0]).parent}{os.pathsep}{os.environ['PATH']}" if len(COMMAND) == 1 else os.environ["PATH"]
    if len(COMMAND) > 1:  # no console script: a krita-sdxl function in the shell
        line = f'krita-sdxl() {{ {shlex.join(COMMAND)} "$@"; }}; {line}'
    return subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": path}
    )


def test_the_printed_authorize_line_pastes_into_a_shell(tmp_path):
    """Every Z85 character a key may hold survives the shell: the key ``keys`` prints is the key authorized."""
    made = krita_sdxl("keys", "--dir", str(tmp_path / "keys"), "--name", "laptop")
    assert made.returncode == 0, made.stderr
    public = zmq.auth.load_certificate(str(tmp_path / "keys" / "laptop.key"))[0].decode()
    line = next(x for x in made.stdout.splitlines() if "krita-sdxl authorize" in x).split(": ", 1)[1]
    worst = "0*?()0&<>#0$!{}0[]^%0@:+=0/.-*0?&<#0$!()"  # a valid key of the shell's worst characters
    for key in (public, worst):
        pasted = (
            authorize_command(key, str(tmp_path / "clients"))
            if key != public
            else line.replace("AUTHORIZED_KEYS_FOLDER", shlex.quote(str(tmp_path / "clients")))
        )
        proc = in_a_shell(pasted)
        assert proc.returncode == 0, (pasted, proc.stderr)
    stored = sorted(zmq.auth.load_certificate(str(f))[0].decode() for f in (tmp_path / "clients").glob("*.key"))
    assert stored == sorted([public, worst])


def test_each_authorized_client_gets_its_own_file(tmp_path):
    clients = tmp_path / "clients"
    keys = [zmq.curve_keypair()[0].decode() for _ in range(2)]
    for key in keys:
        proc = krita_sdxl("authorize", key, "--dir", str(clients))
        assert proc.returncode == 0, proc.stderr
    files = sorted(clients.glob("*.key"))
    assert len(files) == 2
    assert sorted(zmq.auth.load_certificate(str(f))[0].decode() for f in files) == sorted(keys)
    assert krita_sdxl("authorize", f'"{keys[0]}"', "--dir", str(clients)).returncode == 0  # pasted with quotes
    assert len(list(clients.glob("*.key"))) == 2  # the same key again: no new file
    named = krita_sdxl("authorize", keys[0], "--dir", str(clients), "--name", "artist")
    assert named.returncode == 0
    assert_refused(krita_sdxl("authorize", keys[1], "--dir", str(clients), "--name", "artist"), 2, "another client")
    assert zmq.auth.load_certificate(str(clients / "artist.key"))[0].decode() == keys[0]
    assert_refused(krita_sdxl("authorize", "short", "--dir", str(clients)), 2, "40 Z85 characters")


@pytest.fixture(scope="module")
def curve_service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("curve")
    for name in ("server", "artist"):
        assert krita_sdxl("keys", "--dir", str(folder), "--name", name).returncode == 0
    (folder / "clients").mkdir()
    svc = start_service(
        ["--identity", "--curve-secret-key", str(folder / "server.key_secret"), "--authorized-keys",
         str(folder / "clients")]
    )  # fmt: skip
    yield svc, folder
    svc.stop()


def test_info_and_refine_against_a_curve_service(curve_service, tmp_path):
    svc, keys = curve_service
    plain = krita_sdxl("info", "--endpoint", svc.endpoint)
    line = assert_refused(plain, 1, "requires CURVE keys", "--server-key", "--client-key")
    assert "running" not in line  # not "is krita-sdxl serve running?": it is, and wants keys
    mine = ["--server-key", str(keys / "server.key"), "--client-key", str(keys / "artist.key_secret")]
    public = zmq.auth.load_certificate(str(keys / "artist.key"))[0].decode()
    refused = krita_sdxl("info", "--endpoint", svc.endpoint, *mine)
    line = assert_refused(refused, 1, "refused this client's key", f"krita-sdxl authorize {shlex.quote(public)}")
    pasted = line.split(": ")[-1].replace("AUTHORIZED_KEYS_FOLDER", shlex.quote(str(keys / "clients")))
    assert in_a_shell(pasted).returncode == 0  # the line as printed, pasted into a shell (Z85 keys hold * ? < > #)
    info = krita_sdxl("info", "--endpoint", svc.endpoint, *mine)
    assert info.returncode == 0 and f"protocol    {PROTOCOL_VERSION}" in info.stdout, info.stderr
    server_key = zmq.auth.load_certificate(str(keys / "server.key"))[0].decode()
    picture, out = rgba_picture(tmp_path / "in.png"), tmp_path / "out.png"
    proc = krita_sdxl("refine", str(picture), "--endpoint", svc.endpoint, "--server-key", server_key,
                      "--client-key", str(keys / "artist.key_secret"), "-o", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with PILImage.open(out) as a, PILImage.open(picture) as b:
        assert a.tobytes() == b.tobytes()  # the identity service sends the pixels back untouched
    wrong = ["--server-key", str(keys / "artist.key"), "--client-key", str(keys / "artist.key_secret")]
    assert_refused(krita_sdxl("info", "--endpoint", svc.endpoint, *wrong), 1, "is --server-key the service's")
    half = krita_sdxl("info", "--endpoint", svc.endpoint, "--server-key", server_key)
    assert_refused(half, 2, "CURVE needs both")
    secretless = krita_sdxl("info", "--endpoint", svc.endpoint, "--server-key", server_key, "--client-key",
                            str(keys / "artist.key"))  # fmt: skip
    assert_refused(secretless, 2, "no secret key there")


def test_a_key_that_starts_with_a_dash_is_a_key_not_an_option(tmp_path):
    """One key in 85 starts with ``-``; ``-h...`` would even ask for help. Both are authorized, wherever
    the key stands among the flags, pasted bare or quoted."""
    clients = tmp_path / "clients"
    worst = "0*?()0&<>#0$!{}0[]^%0@:+=0/.-*0?&<#0$!()"  # a valid key; a first digit of - or h keeps it valid
    keys = ["-" + worst[1:], "-h" + worst[2:], "--" + worst[2:]]
    for n, key in enumerate(keys):
        argv = (
            ["authorize", key, "--dir", str(clients)]
            if n != 1
            else ["authorize", "--dir", str(clients), "--name", "helpish", f"'{key}'"]
        )
        proc = krita_sdxl(*argv)
        assert proc.returncode == 0, (key, proc.stderr)
    stored = sorted(zmq.auth.load_certificate(str(f))[0].decode() for f in clients.glob("*.key"))
    assert stored == sorted(keys)
