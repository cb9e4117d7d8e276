"""Differential fuzzing: the same answer bytes read by the proxy's upstream client and by h11
(the pure-Python HTTP/1.1 parser httpx's transport uses), split into reads at random places.

Where both accept an answer they must agree on its status, its header list and its body (and
whether it ended). Where h11 refuses one the client must refuse it too. The client may refuse
what h11 accepts only for what RFC 9112 lets a recipient refuse and the client documents
refusing (``proxy.adapters.lean``): the case's generator marks each such construct. Seeded:
the same cases every run.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
from dataclasses import dataclass, field

import h11
import pytest

from proxy.adapters.lean import MAX_INTERIM, Answer, LeanPool, _Conn

CASES = 3000
#: Constructs the client refuses where h11 reads on (RFC 9112 lets a recipient refuse each).
STRICTER = frozenset({"bare-lf", "obs-fold", "duplicate-length", "length-and-chunked",
                      "status-range", "interim-flood", "mutated"})


@dataclass
class Read:
    """What a parser made of an answer: ``None`` status when it refused it."""

    status: int | None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False


@dataclass
class Case:
    data: bytes
    flags: set[str]
    splits: list[int]


class Sink(asyncio.Transport):
    """Where the client writes its request; nothing is sent anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def pieces(case: Case) -> list[bytes]:
    data, cuts = case.data, sorted(set(case.splits))
    bounds = [0, *[c for c in cuts if 0 < c < len(data)], len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def ours(case: Case, pool: LeanPool, loop: asyncio.AbstractEventLoop) -> Read:
    conn = _Conn(pool, loop)
    conn.connection_made(Sink())
    answer = Answer(conn, None)
    conn.send(answer, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    for piece in pieces(case):
        if conn.closed:
            break
        conn.data_received(piece)
    if not conn.closed:
        conn.connection_lost(None)  # the upstream's end of stream
    if answer._error is not None or not answer.status:
        return Read(None)
    body = b"".join(answer._chunks)
    return Read(answer.status, [(n.lower(), v) for n, v in answer.headers], body, answer._done)


#: Transfer-coding names are case-insensitive (RFC 9112 7); h11 reads only "chunked", so the
#: reference is given the name in lower case (and both sides' header lists are compared so).
_CODING = re.compile(rb"(?im)^(transfer-encoding:[ \t]*)(chunked)([ \t]*)$")


#: The reason phrase is never read (the proxy answers with its own): the reference reads every
#: status line's that holds a control character as "OK" (llhttp lets those by, h11 refuses
#: them): no disagreement about the answer.
_REASON = re.compile(rb"(?m)^(HTTP/1\.[01] \d{3} )[^\r\n]*[\x00-\x08\x0b\x0c\x0e-\x1f\x7f][^\r\n]*")


def reference(case: Case) -> Read:
    data = _CODING.sub(lambda m: m[1] + m[2].lower() + m[3], case.data)
    data = _REASON.sub(lambda m: m[1] + b"OK", data)
    case = Case(data, case.flags, case.splits)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    read = Read(None)
    try:
        for piece in [*pieces(case), b""]:
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    read.status = event.status_code
                    read.headers = [(n.lower(), v) for n, v in event.headers.raw_items()]
                elif isinstance(event, h11.Data):
                    read.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    read.complete = True
                    return read
                elif isinstance(event, h11.ConnectionClosed):
                    return read
    except h11.RemoteProtocolError:
        return Read(None)
    return read


# -- the generator ----------------------------------------------------------------------------

TOKENS = [b"Content-Type", b"X-Request-Id", b"Cache-Control", b"X-A", b"Set-Cookie", b"Vary",
          b"Server", b"openai-processing-ms", b"x-ratelimit-remaining-tokens"]
VALUES = [b"application/json", b"text/event-stream", b"no-cache", b"a, b", b"", b"caf\xe9",
          b"  padded  ", b"\tx", b"v=1; path=/", b"123", b"\x80\xff"]


def head_lines(rng: random.Random, flags: set[str]) -> list[bytes]:
    lines = []
    for _ in range(rng.randint(0, 6)):
        line = rng.choice(TOKENS) + b":" + rng.choice([b" ", b"", b"  "]) + rng.choice(VALUES)
        if rng.random() < 0.03:
            line += b"\r\n folded"
            flags.add("obs-fold")
        lines.append(line)
    return lines


def framed(rng: random.Random, flags: set[str], status: int) -> tuple[list[bytes], bytes]:
    body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 40, 300])))
    kind = rng.choice(["length", "length", "chunked", "chunked", "close", "short", "long",
                       "duplicate", "differing", "both", "te-other"])
    if kind == "length":
        return [b"Content-Length: %d" % len(body)], body
    if kind == "short":  # names more than it sends
        return [b"Content-Length: %d" % (len(body) + 7)], body
    if kind == "long":  # sends more than it names: the rest is not this answer
        return [b"Content-Length: %d" % len(body)], body + b"HTTP/1.1 200 OK\r\n\r\n"
    if kind == "duplicate":
        flags.add("duplicate-length")
        return [b"Content-Length: %d" % len(body)] * 2, body
    if kind == "differing":
        return [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)], body
    if kind == "close":
        return [], body
    if kind == "te-other":
        return [b"Transfer-Encoding: gzip"], body
    chunks, rest = [], body
    while rest:
        size = rng.randint(1, max(1, len(rest)))
        ext = rng.choice([b"", b"", b";a=b", b";x"])
        chunks.append(b"%x%s\r\n%s\r\n" % (size, ext, rest[:size]))
        rest = rest[size:]
    trailer = rng.choice([b"", b"", b"X-Trailer: t\r\n"])
    encoded = b"".join(chunks) + b"0\r\n" + trailer + b"\r\n"
    lines = [b"Transfer-Encoding: chunked"]
    if kind == "both":
        flags.add("length-and-chunked")
        lines.append(b"Content-Length: %d" % len(body))
    return lines, encoded


def generate(rng: random.Random) -> Case:
    flags: set[str] = set()
    parts = []
    interim = rng.choice([0, 0, 0, 1, 2, MAX_INTERIM + 1])
    if interim > MAX_INTERIM:
        flags.add("interim-flood")
    parts += [b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"] * interim
    status = rng.choice([200, 200, 200, 201, 204, 304, 400, 404, 429, 500, 503, 600, 999])
    if not 100 <= status <= 599:
        flags.add("status-range")
    fields, body = framed(rng, flags, status)
    lines = [b"HTTP/1.1 %d %s" % (status, rng.choice([b"OK", b"", b"Whatever Reason"]))]
    lines += head_lines(rng, flags) + fields
    rng.shuffle(lines[1:])
    eol = b"\r\n"
    if rng.random() < 0.04:
        eol = b"\n"
        flags.add("bare-lf")
    head = eol.join(lines) + eol + eol
    if eol == b"\n":
        head = head.replace(b"\r\n folded", b"\n folded")
    data = b"".join(parts) + head + body
    if rng.random() < 0.15:
        at = rng.randrange(len(data))
        data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1:]
        flags.add("mutated")
    splits = [rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 4))]
    return Case(data, flags, splits)


def agree(a: Read, b: Read) -> bool:
    def listed(read: Read) -> list[tuple[bytes, bytes]]:
        return [(n, v.lower() if n == b"transfer-encoding" else v) for n, v in read.headers]

    return ((a.status, listed(a), a.body, a.complete)
            == (b.status, listed(b), b.body, b.complete))


async def test_the_client_reads_answers_as_h11_does() -> None:
    rng = random.Random(20261206)
    loop = asyncio.get_running_loop()
    pool = LeanPool("127.0.0.1", 9)
    disagreements: list[tuple[Case, Read, Read]] = []
    accepted = 0
    try:
        for _ in range(CASES):
            case = generate(rng)
            mine, theirs = ours(case, pool, loop), reference(case)
            if mine.status is None and theirs.status is None:
                continue
            if mine.status is None and theirs.status is not None:
                if case.flags & STRICTER or not theirs.complete:
                    continue  # refused where RFC 9112 lets it; or h11 too found it cut short
            elif mine.status is not None and (not mine.complete or agree(mine, theirs)):
                accepted += mine.complete
                if not mine.complete and theirs.status is not None and theirs.complete:
                    disagreements.append((case, mine, theirs))
                continue
            disagreements.append((case, mine, theirs))
    finally:
        await pool.close()
    shown = "\n".join(f"{c.data!r} {sorted(c.flags)} {c.splits}:\n  ours {m}\n  h11  {t}"
                      for c, m, t in disagreements[:5])
    assert not disagreements, f"{len(disagreements)} disagreements, first ones:\n{shown}"
    assert accepted > CASES // 4  # a good share of cases are well-formed answers, read whole


@pytest.mark.parametrize("split", [1, 7, 1000])
async def test_one_answer_in_any_number_of_reads(split: int) -> None:
    """The same answer fed one byte, seven bytes or all at once per read."""
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
            b"3;e=1\r\nabc\r\n2\r\nde\r\n0\r\nT: t\r\n\r\n")
    case = Case(data, set(), list(range(split, len(data), split)))
    loop = asyncio.get_running_loop()
    pool = LeanPool("127.0.0.1", 9)
    try:
        mine = ours(case, pool, loop)
    finally:
        await pool.close()
    assert mine == reference(case)
    assert mine.body == b"abcde" and mine.complete
