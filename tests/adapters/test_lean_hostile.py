"""The proxy's upstream client against upstreams that send what no well-behaved server sends:
raw asyncio servers writing exact bytes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from proxy.adapters.lean import MAX_FIELDS, MAX_INTERIM, LeanError, LeanPool
from tests.adapters.test_lean import answer, pool_for, pools, raw_server, read_request

__all__ = ["pools", "raw_server"]  # fixtures, used by name


def script_writing(*parts: bytes, then_wait: float = 5.0) -> Any:
    """A connection script: read one request, write ``parts`` one after another, then wait
    (the test's own client ends first)."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        for part in parts:
            writer.write(part)
            await writer.drain()
        await asyncio.sleep(then_wait)

    return script


@pytest.mark.parametrize("status", [b"99", b"600", b"999", b"000", b"1000"])
async def test_status_outside_100_to_599_is_malformed(
        raw_server: Any, pools: list[LeanPool], status: bytes) -> None:
    raw = await raw_server(script_writing(
        b"HTTP/1.1 %s Odd\r\nContent-Length: 2\r\n\r\nhi" % status))
    pool = pool_for(raw.port, pools)
    with pytest.raises(LeanError, match="malformed answer") as caught:
        await pool.request("POST", "/", b"x", first_byte=30)
    assert caught.value.stage == "send"
    assert pool.idle == 0


FRAMING = {
    "two differing Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                    b"Content-Length: 3\r\n\r\nhi",
    "the same Content-Length twice": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                     b"Content-Length: 2\r\n\r\nhi",
    "Content-Length with chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    "a chunk size that is not hex": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"zz\r\nhi\r\n0\r\n\r\n",
    "a negative Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nhi",
    "a bare LF in the head": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi",
    "an obs-fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\nContent-Length: 2\r\n\r\nhi",
    "a chunk extension with a bare CR": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                        b"\r\n2;a=\rb\r\nhi\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", list(FRAMING))
async def test_ambiguous_framing_is_refused(raw_server: Any, pools: list[LeanPool],
                                            case: str) -> None:
    """RFC 9112 lets a recipient reject each of these; a proxy must, as the next hop could
    frame the message differently (response splitting, smuggling)."""
    raw = await raw_server(script_writing(FRAMING[case]))
    pool = pool_for(raw.port, pools)
    with pytest.raises(LeanError, match="malformed answer"):
        response = await pool.request("POST", "/", b"x", first_byte=30, idle=30)
        await response.read()
    assert pool.idle == 0


async def test_a_header_flood_is_bounded(raw_server: Any, pools: list[LeanPool]) -> None:
    lines = b"".join(b"X-Flood-%d: %s\r\n" % (i, b"v" * 40) for i in range(20_000))
    raw = await raw_server(script_writing(b"HTTP/1.1 200 OK\r\n", lines, b"\r\n"))
    pool = pool_for(raw.port, pools)
    with pytest.raises(LeanError, match=f"more than {MAX_FIELDS} header fields"):
        await pool.request("POST", "/", b"x", first_byte=30)


async def test_an_interim_answer_flood_is_bounded(raw_server: Any,
                                                  pools: list[LeanPool]) -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    raw = await raw_server(script_writing(hints * 5_000, answer(b"late")))
    pool = pool_for(raw.port, pools)
    with pytest.raises(LeanError, match=f"more than {MAX_INTERIM} interim answers"):
        await pool.request("POST", "/", b"x", first_byte=30)


async def test_a_trailer_flood_is_bounded(raw_server: Any, pools: list[LeanPool]) -> None:
    trailers = b"".join(b"X-T-%d: v\r\n" % i for i in range(20_000))
    raw = await raw_server(script_writing(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n", trailers,
        b"\r\n"))
    pool = pool_for(raw.port, pools)
    response = await pool.request("POST", "/", b"x", first_byte=30, idle=30)
    with pytest.raises(LeanError, match="header fields") as caught:
        await response.read()
    assert caught.value.stage == "body"


async def test_trailers_are_read_and_not_kept(raw_server: Any, pools: list[LeanPool]) -> None:
    raw = await raw_server(script_writing(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: 1\r\n\r\n"
        b"2\r\nhi\r\n0\r\nX-Trailer: t\r\n\r\n"))
    pool = pool_for(raw.port, pools)
    response = await pool.request("POST", "/", b"x")
    assert await response.read() == b"hi"
    assert [name for name, _ in response.headers] == [b"Transfer-Encoding", b"X-Head"]
    assert pool.idle == 1


async def test_switching_protocols_is_returned_without_a_logged_error(
        raw_server: Any, pools: list[LeanPool], caplog: pytest.LogCaptureFixture) -> None:
    raw = await raw_server(script_writing(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"\r\n\x81\x05hello"))
    pool = pool_for(raw.port, pools)
    with caplog.at_level(logging.DEBUG):
        response = await pool.request("POST", "/", b"x", first_byte=30)
        assert response.status == 101
        response.close()
        await asyncio.sleep(0)
    assert pool.idle == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_total_ends_an_answer_that_keeps_arriving(raw_server: Any,
                                                        pools: list[LeanPool]) -> None:
    """An endless stream read more slowly than it arrives always has bytes waiting, so no
    read ever waits; ``total`` still ends it."""
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"6\r\nevent\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.005)

    raw = await raw_server(endless)
    pool = pool_for(raw.port, pools)
    response = await pool.request("POST", "/", b"x", first_byte=30, idle=30, total=0.3)
    reads = 0
    with pytest.raises(TimeoutError):
        for reads in range(1, 400):  # noqa: B007 - counted for the message below
            assert await response.readany(), "the endless stream ended"
            await asyncio.sleep(0.02)  # a slow reader: bytes are always waiting
    assert reads < 399, "total never ended the stream"
    assert pool.idle == 0


async def test_bytes_after_a_complete_answer_close_its_connection(
        raw_server: Any, pools: list[LeanPool]) -> None:
    """A second answer in the same write is never read as the next request's answer."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
        while await read_request(reader):
            writer.write(answer(b"conn %d" % i) + answer(b"rogue"))

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    assert await (await pool.request("POST", "/", b"x")).read() == b"conn 0"
    assert await (await pool.request("POST", "/", b"x")).read() == b"conn 1"
    assert pool.opened == 2


async def test_late_bytes_on_an_idle_connection_close_it(raw_server: Any,
                                                         pools: list[LeanPool]) -> None:
    sent_late = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
        while await read_request(reader):
            writer.write(answer(b"conn %d" % i))
            await writer.drain()
            if i == 0:
                await asyncio.sleep(0.05)
                writer.write(answer(b"rogue"))  # to nobody: nothing was asked
                await writer.drain()
                sent_late.set()

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    assert await (await pool.request("POST", "/", b"x")).read() == b"conn 0"
    await sent_late.wait()
    for _ in range(200):
        if pool.idle == 0:
            break
        await asyncio.sleep(0.005)
    assert await (await pool.request("POST", "/", b"x")).read() == b"conn 1"


async def test_idle_connections_are_swept_after_keep_idle(raw_server: Any,
                                                          pools: list[LeanPool]) -> None:
    closed = asyncio.Event()
    closes = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        nonlocal closes
        try:
            while await read_request(reader):
                await asyncio.sleep(0.01)
                writer.write(answer(b"ok"))
        finally:
            closes += 1
            if closes == 3:
                closed.set()

    now = [1000.0]
    raw = await raw_server(script)
    pool = pool_for(raw.port, pools, keep_idle=30.0, clock=lambda: now[0])

    async def one() -> bytes:
        return await (await pool.request("POST", "/", b"x")).read()

    assert await asyncio.gather(one(), one(), one()) == [b"ok"] * 3
    assert pool.idle == 3 and pool._sweeper is not None  # the sweep is armed
    now[0] += 29.0
    assert pool.sweep() == 0
    now[0] += 2.0
    assert pool.sweep() == 3
    assert pool.idle == 0
    await asyncio.wait_for(closed.wait(), 10)  # the upstream saw each one close
    assert pool.open == 0


async def test_request_header_bytes_outside_ascii_go_as_sent(raw_server: Any,
                                                             pools: list[LeanPool]) -> None:
    """The server side reads header bytes as UTF-8 with surrogateescape; they leave as they
    came, byte for byte."""
    heads: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer(b"ok"))
        await writer.drain()

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    sent = [("content-type", b"\xff\xfe".decode("utf-8", "surrogateescape")),
            ("accept", "text/caf\u00e9")]
    response = await pool.request("POST", "/", b"x", sent)
    assert await response.read() == b"ok"
    assert b"\r\ncontent-type: \xff\xfe\r\n" in heads[0]
    assert b"\r\naccept: text/caf\xc3\xa9\r\n" in heads[0]
