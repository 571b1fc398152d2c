"""Issue 20, item 6: one odd entry in the authorized keys folder shut out everybody. A symlink loop or a
link to an unreadable target refused every client and ended live sessions; a 40 MB key file stalled
the service (6 of 11 hellos unanswered for 16 s). In-process CURVE services, real sockets, real files."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
from attack import CurveService, SlowEngine, header, keypair

ODD = ("loop.key", "dangling.key", "unreadable.key", "folder.key", "fifo.key", "huge.key", "text.key")


def add_odd_entries(folder: Path) -> None:
    os.symlink("loop.key", folder / "loop.key")  # a link to itself: ELOOP
    os.symlink(folder / "nowhere", folder / "dangling.key")
    os.symlink("/proc/self/mem", folder / "unreadable.key")  # opens, but reading it fails (even for root)
    (folder / "folder.key").mkdir()
    os.mkfifo(folder / "fifo.key")  # opening it for reading would block for ever
    for name, body in (("huge.key", b'curve\n    public-key = "' + b"x" * 40 * 1024 * 1024 + b'"\n'),  # 40 MB
                       ("text.key", b"not a key\n")):  # fmt: skip
        (folder.parent / name).write_bytes(body)
        os.replace(folder.parent / name, folder / name)  # whole at once, as a person's copy ends up


@pytest.fixture
def curve(tmp_path: Path):
    authorized = tmp_path / "authorized"
    artist = keypair(tmp_path / "clients", "artist", authorized)
    svc = CurveService(tmp_path, authorized, SlowEngine())
    try:
        yield svc, artist
    finally:
        svc.close()


def test_odd_entries_are_skipped_with_one_warning_each_and_shut_nobody_out(curve, caplog, tmp_path: Path):
    svc, artist = curve
    caplog.set_level(logging.WARNING, logger="krita_sdxl.backend.service.authorized")
    with svc.peer(artist) as live:
        assert live.ask([header("hello")]).type == "welcome"
        add_odd_entries(svc.authorized)
        newcomer = keypair(tmp_path / "clients", "newcomer", svc.authorized)  # and one good key, added now
        time.sleep(1.0)  # several reloads (every 0.2 s)
        assert live.ask([header("heartbeat")], timeout=2).type == "heartbeat"  # the live session goes on
        answered = []

        def hello(secret: Path) -> None:
            with svc.peer(secret) as peer:
                started = time.monotonic()
                reply = peer.ask([header("hello")], timeout=5)
                answered.append(reply is not None and reply.type == "welcome" and time.monotonic() - started < 2)

        threads = [threading.Thread(target=hello, args=(s,)) for s in [artist, newcomer] * 6]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert answered == [True] * 12  # every hello answered at once (was: 6 of 11 unanswered for 16 s)
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    for name in ODD:
        assert sum(name in w for w in warnings) == 1, (name, warnings)  # one warning each, not one per reload
    assert not any("no client is admitted" in r.getMessage() for r in caplog.records)
