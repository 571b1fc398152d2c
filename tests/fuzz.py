"""A structure-aware fuzzer for the service: mutations of valid messages, over real sockets.

Shared by the CI test (tests/test_fuzz.py, 50,000 messages) and the benchmark
(tests/benchmarks/bench_fuzz.py, as many as asked). Messages start from valid ones (submit with an
image and sometimes a mask, its pixels in a chunk message right after it; hello, status, cancel,
heartbeat, unload; a chunk or a credit for no job) and get one to three mutations: field types,
huge/negative/NaN/infinite numbers, long strings and keys, deep nesting, image specs, the version and
type, frame counts and sizes, chunk offsets and sizes, truncated or flipped header bytes, random bytes.

Sockets: several clients with unguessable routing ids; clients with predictable ones (short, a zero
first byte, libzmq's own) that must get ``bad_identity`` for everything; and one that forges a live
client's id, which must get nothing at all. Every event received is decoded and validated with
the protocol codec. The accounting is exact: every message to a well-identified client gets exactly
one immediate answer (a ``credit`` answers a submit or a chunk), and every ``accepted`` job ends with
exactly one ``result`` or ``cancelled`` (a mutated ``cancel`` can name a live job: a job id mutated to a
long string is the same string every time). A ``cancelled`` both answers the cancel and ends the job;
for a running job it comes when the worker stops. A job that ends before the cancel takes hold answers
it with its result (then ``unknown_job`` too, when the job had ended before the cancel came: one
answer counted). A result's chunks are acknowledged with ``credit`` as a client does (those messages
get no answer); an upload a mutated chunk left waiting is cancelled.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
from soak import rss_kib

from krita_sdxl.protocol import PROTOCOL_VERSION, SERVICE, decode
from krita_sdxl.protocol.errors import ALL_CODES

V = PROTOCOL_VERSION

IMMEDIATE = {"error", "welcome", "status", "heartbeat", "unloaded", "accepted", "cancelled", "credit"}
WEIRD_NUMBERS = [0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 1e-300, 1e-30, -1e-9, 1e308, -1e308,
                 math.nan, math.inf, -math.inf, 0.5, 499, 500, 501, 16385]  # fmt: skip
ORDERS = ["RGBA", "BGRA", "RGB", "BGR", "L"]


class Mutator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.jobs = 0
        self.cancels: list[str] = []  # jobs of the last ``messages()`` that it cancels

    # -- valid messages --------------------------------------------------------------------

    def valid(self) -> list[tuple[dict[str, Any], list[bytes]]]:
        """One valid request: a message, or a submit and the chunk with its pixels."""
        r = self.rng
        kind = r.choices(["submit", "hello", "status", "cancel", "heartbeat", "unload", "chunk", "credit"],
                         [6, 1, 1, 1, 1, 1, 1, 1])[0]  # fmt: skip
        if kind == "submit":
            self.jobs += 1
            w, h = r.randint(1, 24), r.randint(1, 24)
            order = r.choice(ORDERS[:4])
            depth, sample = r.choice([(8, "uint"), (16, "uint"), (16, "float"), (32, "float")])
            head: dict[str, Any] = {
                "job": f"f{self.jobs}",
                "image": {"width": w, "height": h, "order": order, "depth": depth, "sample": sample},
                "prompt": "x" * r.randint(0, 20),
                "steps": r.randint(1, 8),
                "strength": r.choice([0.3, 1.0, 0.05]),
                "seed": r.randint(0, 2**32),
            }
            stream = bytes(w * h * len(order) * depth // 8)
            if r.random() < 0.2:
                head["mask"] = {"width": w, "height": h, "order": "L"}
                stream += bytes(w * h)
            chunk = {"v": V, "type": "chunk", "job": head["job"], "offset": 0}
            return [({"v": V, "type": "submit", **head}, []), (chunk, [stream])]
        if kind == "cancel":  # never a job that exists: its answer is always immediate
            return [({"v": V, "type": "cancel", "job": f"c{r.randrange(10**6)}"}, [])]
        if kind == "hello":
            return [({"v": V, "type": "hello", "client": "fuzz"}, [])]
        if kind == "status":
            return [({"v": V, "type": "status", "job": r.choice([None, "f1", "zz"])}, [])]
        if kind == "unload":
            return [({"v": V, "type": "unload", "model": r.choice(["base", "refiner"])}, [])]
        if kind == "chunk":  # for no upload: unknown_job
            return [({"v": V, "type": "chunk", "job": f"n{r.randrange(10**6)}", "offset": 0}, [b"x" * 16])]
        if kind == "credit":  # for no result: unknown_job
            return [({"v": V, "type": "credit", "job": f"n{r.randrange(10**6)}", "received": 16}, [])]
        return [({"v": V, "type": "heartbeat"}, [])]

    # -- mutations -------------------------------------------------------------------------

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        pick = r.randrange(10)
        if pick == 0:
            return r.choice(WEIRD_NUMBERS)
        if pick == 1:
            return "s" * r.choice([0, 1, 41, 129, 201, 1001, 4001, 8001, r.randrange(100_000)])
        if pick == 2:
            return bytes(r.randrange(64)) if r.random() < 0.8 else msgpack.ExtType(r.randrange(128), b"e")
        if pick == 3:
            return r.choice([True, False, None])
        if pick == 4 and depth < 3:
            return [self.value(depth + 1) for _ in range(r.randrange(6))]
        if pick == 5 and depth < 3:
            return {f"k{i}": self.value(depth + 1) for i in range(r.randrange(4))}
        if pick == 6:
            return r.uniform(-1e6, 1e6)
        if pick == 7:
            return r.randint(-(2**63), 2**64 - 1)
        if pick == 8:
            return list(range(r.choice([10, 1000, 4096])))
        return r.choice(["RGBA", "L", "refine", "generate", "two_stage", "srgb", "linear", ""])

    def nested(self, depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = [value] if self.rng.random() < 0.5 else {"n": value}
        return value

    def mutate(self, head: dict[str, Any], frames: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        r = self.rng
        keys = [k for k in head if k not in ("v", "type")] or ["job"]
        what = r.randrange(13)
        if what == 0:  # a field gets another type or a weird value
            head[r.choice(keys)] = self.value()
        elif what == 1:  # weird numbers where numbers belong
            head[r.choice(["steps", "strength", "seed", "guidance_scale", "feather", "denoising_end",
                           "work_width", "aesthetic_score"])] = r.choice(WEIRD_NUMBERS)  # fmt: skip
        elif what == 2:  # an unknown key, short or very long
            head["u" * r.choice([1, 199, 201, 5000, r.randrange(60_000)])] = self.value()
        elif what == 3:  # deep nesting
            head[r.choice([*keys, "v", "type"])] = self.nested(r.choice([5, 31, 33, 200, 500]))
        elif what == 4 and isinstance(head.get("image"), dict):  # the image spec
            key = r.choice(["width", "height", "order", "depth", "sample", "extra" * r.randrange(1, 80)])
            head["image"][key] = self.value()
        elif what == 5:  # version and type
            head[r.choice(["v", "type"])] = r.choice([self.value(), 1, 2.0, True, 0, "submit", "chunk", "x" * 5000])
        elif what == 6:  # a missing field
            head.pop(r.choice([*keys, "v", "type"]), None)
        elif what == 7 and frames:  # a chunk of the wrong size
            i = r.randrange(len(frames))
            frames[i] = frames[i][: r.randrange(len(frames[i]) + 1)] if r.random() < 0.5 else frames[i] + b"\0" * 7
        elif what == 8:  # frames missing or added, sometimes very many
            if frames and r.random() < 0.4:
                frames.pop()
            else:
                frames.extend([b"x" * r.randrange(32)] * r.choice([1, 2, 3, 20, 500]))
        elif what == 9:  # mode and step planning extremes
            head.update(mode=r.choice(["refine", "generate", "two_stage", "m" * 41]),
                        strength=r.choice([1e-30, 1e-9, 1e-3, 1.0]), denoising_end=r.choice([1e-300, 0.8]))  # fmt: skip
        elif what == 10:
            head["job"] = r.choice(["", "j" * 129, 5, None, ["x"], "j" * 128])
        elif what == 11 and head.get("type") == "chunk":  # offsets
            head["offset"] = r.choice([1, -1, 2**40, 2**41, 0.0, "0", None])
        else:
            head["prompt"] = "p" * r.choice([8000, 8001, 100_000])
        return head, frames

    def messages(self) -> list[list[bytes]]:
        """The frames of one request's messages (one, or a submit and its chunk), one of them mutated
        (or none)."""
        r = self.rng
        self.cancels = []
        request = self.valid()
        roll = r.random()
        if roll < 0.25:
            return [[msgpack.packb(head, use_bin_type=True), *frames] for head, frames in request]
        target = r.randrange(len(request))
        out = []
        for i, (head, frames) in enumerate(request):
            if i == target:
                out.append(self._mutated(head, frames, roll))
            else:
                out.append([msgpack.packb(head, use_bin_type=True), *frames])
        if target == 1:  # a mutated chunk may leave its upload waiting for ever: the client gives up on it
            out.append([msgpack.packb({"v": V, "type": "cancel", "job": request[0][0]["job"]})])
            self.cancels.append(request[0][0]["job"])  # (a chunk the mutation left valid: the job may run)
        return out

    def _mutated(self, head: dict[str, Any], frames: list[bytes], roll: float) -> list[bytes]:
        r = self.rng
        for _ in range(r.randint(1, 3)):
            head, frames = self.mutate(head, frames)
        packed = msgpack.packb(head, use_bin_type=True)
        if roll > 0.95:  # the bytes themselves: truncated, flipped, random, nested deeper than msgpack packs
            how = r.randrange(5)
            if how == 4:  # not a map
                packed = msgpack.packb(r.choice([[1, 2], "hello", 42, None, b"bytes", 1.5]))
            elif how == 3:
                packed = b"\x82\xa1v" + b"\x91" * r.choice([1000, 1100, 5000]) + b"\x02\xa4type\xa5hello"
            elif how == 0:
                packed = packed[: r.randrange(len(packed) + 1)]
            elif how == 1 and packed:
                i = r.randrange(len(packed))
                packed = packed[:i] + bytes([r.randrange(256)]) + packed[i + 1 :]
            else:
                packed = r.randbytes(r.randrange(64))
        return [packed, *frames]


@dataclass
class Tally:
    sent: int = 0
    immediate: int = 0
    accepted: int = 0
    results: int = 0
    ended: int = 0  # results and cancellations: each accepted job ends once
    events: int = 0
    chunks: int = 0  # of results (acknowledged)
    open_uploads: set[str] = field(default_factory=set)  # credited, not yet accepted or refused
    downloading: dict[str, int] = field(default_factory=dict)  # results whose chunks are on their way
    accepted_jobs: set[str] = field(default_factory=set)
    cancelling: set[str] = field(default_factory=set)  # jobs this client cancelled: each cancel answered once
    answered_by_result: set[str] = field(default_factory=set)  # cancels whose job's result came first
    codes: dict[str, int] = field(default_factory=dict)


def _receive(sock: zmq.Socket, tally: Tally, problems: list[str]) -> Any:
    event = decode(SERVICE, sock.recv_multipart(copy=False))  # validates every field, as a client does
    tally.events += 1
    if event.type == "chunk":  # a result's bytes: acknowledged, as a client does (no answer to that)
        tally.chunks += 1
        received = event["offset"] + event.payload.nbytes
        if received >= tally.downloading.get(event.job, 0):
            tally.downloading.pop(event.job, None)
        sock.send(msgpack.packb({"v": V, "type": "credit", "job": event.job, "received": received}))
        return event
    stalled = event.type == "error" and "its upload was dropped" in event["message"]  # the end of an upload
    late = event.type == "error" and event["code"] == "unknown_job" and event.job in tally.answered_by_result
    if late:  # the job had ended when its cancel came: the result counted as the answer already
        tally.answered_by_result.discard(event.job)
    elif event.type in IMMEDIATE and not stalled:
        tally.immediate += 1
        if event.type in ("cancelled", "error"):
            tally.cancelling.discard(event.job)
    elif event.type == "result" and event.job in tally.cancelling:
        # the job ran to its end before the worker saw the cancel (or before the cancel came, which then
        # gets unknown_job too): its result answers the cancel
        tally.immediate += 1
        tally.cancelling.discard(event.job)
        tally.answered_by_result.add(event.job)
    stuck: set[str] = set()
    if event.type == "credit":
        if 0 < event["received"] < event["until"]:
            stuck.add(event.job)  # a short chunk: this client sent its one chunk, the upload waits for ever
        else:
            tally.open_uploads.add(event.job)
    elif event.type == "error" and "still uploading" in event["message"]:
        stuck |= tally.open_uploads  # the upload before waits for a chunk that was mutated away
    elif event.type in ("accepted", "error", "cancelled"):
        tally.open_uploads.discard(event.job)
    for job in sorted(stuck):  # cancelled (its answer: cancelled, or unknown_job if it ended meanwhile)
        tally.open_uploads.discard(job)
        sock.send(msgpack.packb({"v": V, "type": "cancel", "job": job}))
        tally.sent += 1
        tally.cancelling.add(job)
    if event.type == "accepted":
        tally.accepted += 1
        tally.accepted_jobs.add(event.job)
    if event.type == "result":
        tally.results += 1
        tally.downloading[event.job] = event["image"].byte_length  # its chunks follow
    if event.type == "result" or (event.type == "cancelled" and event.job in tally.accepted_jobs):
        tally.ended += 1
    if event.type == "error":
        code = event["code"]
        tally.codes[code] = tally.codes.get(code, 0) + 1
        if code not in ALL_CODES:
            problems.append(f"unknown error code {code!r}")
        if code == "internal":
            problems.append(f"internal error: {event['message'][:300]}")
    return event


def run_fuzz(endpoint: str, pid: int, count: int, seed: int = 1, clients: int = 4, batch: int = 250) -> dict:
    """Send ``count`` fuzzed messages; returns figures and the problems found (empty = all good).

    The context is destroyed however the run ends: one left to the garbage collector after a failed
    run blocked in ``term()`` during a later test and held CI until its 90-minute limit."""
    ctx = zmq.Context()
    try:
        return _fuzz(ctx, endpoint, pid, count, seed, clients, batch)
    finally:
        ctx.destroy(linger=0)


def _fuzz(ctx: zmq.Context, endpoint: str, pid: int, count: int, seed: int, clients: int, batch: int) -> dict:
    rng = random.Random(seed)
    problems: list[str] = []

    def sock(routing_id: bytes | None) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        if routing_id is not None:
            s.setsockopt(zmq.ROUTING_ID, routing_id)
        s.connect(endpoint)
        return s

    good = [sock(b"f" + rng.randbytes(16)) for _ in range(clients)]
    # (a forged libzmq id such as 00 6b8b4567 may equal the one libzmq gave sock(None): then it is a
    # duplicate of a live id and gets nothing at all; tests/test_sessions.py covers that attack)
    bad = [sock(None), sock(b"\x00" + rng.randbytes(20)), sock(b"short")]
    for s in good:  # connected and known before anyone forges their ids
        s.send(msgpack.packb({"v": V, "type": "heartbeat"}))
        if not s.poll(10_000):
            raise RuntimeError("the service does not answer")
        s.recv_multipart()
    forger = sock(good[0].getsockopt(zmq.ROUTING_ID))
    tallies = {id(s): Tally() for s in good + bad}
    mutator = Mutator(seed)
    rss: list[tuple[int, int]] = [(0, rss_kib(pid))]
    t0 = time.monotonic()
    sent = 0
    while sent < count:
        n = min(batch, count - sent)  # requests; a submit is two messages (its chunk follows)
        for _ in range(n):
            target = rng.choice(good) if rng.random() < 0.85 else rng.choice(bad)
            for frames in mutator.messages():
                target.send_multipart(frames)
                tallies[id(target)].sent += 1
            tallies[id(target)].cancelling.update(mutator.cancels)
        if rng.random() < 0.05:
            forger.send(msgpack.packb({"v": V, "type": "status"}))
        sent += n
        deadline = time.monotonic() + 30
        for s in good + bad:  # every message answered before the next batch goes
            t = tallies[id(s)]
            while t.immediate < t.sent or t.ended < t.accepted or t.downloading:
                left = deadline - time.monotonic()
                if left <= 0 or not s.poll(int(left * 1000)):
                    raise AssertionError(f"no answer after {sent} messages: {t}")
                try:
                    _receive(s, t, problems)
                except Exception as exc:  # an event that does not decode or validate
                    problems.append(f"bad event: {type(exc).__name__}: {exc}")
                    t.immediate += 1
        while any(s.poll(0) for s in good + bad):  # nothing more than expected
            for s in good + bad:
                if s.poll(0):
                    extra = _receive(s, tallies[id(s)], problems)
                    problems.append(f"an unexpected extra event: {extra.type} {extra.fields}"[:300])
        if sent % 5000 < batch:
            rss.append((sent, rss_kib(pid)))
    seconds = time.monotonic() - t0
    if forger.poll(500):
        problems.append("the peer that forged a live id received something")
    for s in bad:
        t = tallies[id(s)]
        if t.codes.get("bad_identity", 0) != t.sent:
            problems.append(f"a predictable id got something other than bad_identity: {t}")
    rss.append((sent, rss_kib(pid)))
    warm = rss[min(2, len(rss) - 1)][1]  # after the first 10,000 messages
    totals = Tally()
    for t in tallies.values():
        totals.sent += t.sent
        totals.events += t.events
        totals.accepted += t.accepted
        totals.results += t.results
        totals.ended += t.ended
        totals.chunks += t.chunks
        for code, k in t.codes.items():
            totals.codes[code] = totals.codes.get(code, 0) + k
    return {
        "requests": sent,  # a submit and its chunk are one request
        "messages": totals.sent,
        "seconds": round(seconds, 2),
        "messages_per_s": round(totals.sent / seconds),
        "events": totals.events,
        "accepted": totals.accepted,
        "results": totals.results,
        "ended": totals.ended,
        "result_chunks": totals.chunks,
        "error_codes": dict(sorted(totals.codes.items())),
        "rss_kib": rss,
        "rss_warm_kib": warm,
        "rss_end_kib": rss[-1][1],
        "rss_growth_after_warmup": round((rss[-1][1] - warm) / warm, 4),
        "problems": problems,
    }
