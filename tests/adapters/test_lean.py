"""The lean upstream client (proxy.adapters.lean) against real servers on 127.0.0.1: aiohttp's
server for well-formed answers, and a raw asyncio server that writes exact bytes for framing,
closes and faults."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.adapters.lean import HIGH_WATER, ConnectError, LeanError, LeanPool, StaleConnection
from tests.conftest import StartProxy, upstream_url
from tests.fakes.openai_upstream import FakeOpenAI

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's body, read by its Content-Length; b'' at end of stream."""
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    if not head:
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return await reader.readexactly(length)


class RawServer:
    """Runs ``script(reader, writer, connection_index)`` for each connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        try:
            await self.script(reader, writer, index)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(script: Script) -> RawServer:
        raw = RawServer(script)
        raw.server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(raw)
        return raw

    yield start
    for raw in servers:
        assert raw.server is not None
        raw.server.close()
        await raw.server.wait_closed()


@pytest.fixture
async def pools() -> AsyncIterator[list[LeanPool]]:
    made: list[LeanPool] = []
    yield made
    for pool in made:
        await pool.close()


def pool_for(port: int, made: list[LeanPool], **kwargs: Any) -> LeanPool:
    pool = LeanPool("127.0.0.1", port, **kwargs)
    made.append(pool)
    return pool


async def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (it did a moment ago)."""
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(probe.sockets[0].getsockname()[1])
    probe.close()
    await probe.wait_closed()
    return port


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_length_framed_body_and_request_bytes(aiohttp_server: Any,
                                                    pools: list[LeanPool]) -> None:
    seen: list[tuple[str, str, bytes, str | None]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, await request.read(),
                     request.headers.get("X-Key")))
        return web.json_response({"ok": True}, headers={"X-Up": "1"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(app)
    pool = pool_for(server.port, pools)
    response = await pool.request("POST", "/v1/chat/completions", b'{"a":1}',
                                  [("X-Key", "secret"), ("Content-Type", "application/json")])
    assert response.status == 200
    assert response.header(b"x-up") == b"1"
    assert await response.read() == b'{"ok": true}'
    assert seen == [("POST", "/v1/chat/completions", b'{"a":1}', "secret")]


async def test_chunked_body_arrives_as_it_is_sent(aiohttp_server: Any,
                                                  pools: list[LeanPool]) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await release.wait()
        await response.write(b"data: 2\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/s", handler)
    server = await aiohttp_server(app)
    pool = pool_for(server.port, pools)
    response = await pool.request("GET", "/s")
    assert response.header(b"transfer-encoding") == b"chunked"
    chunks = response.chunks()
    assert await chunks.__anext__() == b"data: 1\n\n"  # before the second one exists
    release.set()
    rest = [chunk async for chunk in chunks]
    assert b"".join(rest) == b"data: 2\n\n"


async def test_keep_alive_reuses_one_connection(raw_server: Any, pools: list[LeanPool]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while body := await read_request(reader):
            writer.write(answer(body.upper()))

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    for word in (b"one", b"two", b"three"):
        response = await pool.request("POST", "/", word)
        assert await response.read() == word.upper()
    assert (pool.opened, raw.connections, pool.idle) == (1, 1, 1)


async def test_connection_close_is_not_reused(raw_server: Any, pools: list[LeanPool]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
        await read_request(reader)
        writer.write(answer(b"conn %d" % i, b"Connection: close\r\n"))
        await writer.drain()
        await asyncio.sleep(1)  # the client must not wait for this close

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    first = await pool.request("POST", "/", b"x")
    assert await first.read() == b"conn 0"
    assert pool.idle == 0
    second = await asyncio.wait_for(pool.request("POST", "/", b"x"), 0.5)
    assert await second.read() == b"conn 1"
    assert pool.opened == 2


async def test_close_delimited_body(raw_server: Any, pools: list[LeanPool]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it, then close")

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    response = await pool.request("POST", "/", b"x")
    assert await response.read() == b"all of it, then close"


async def test_stale_idle_connection_is_dropped(raw_server: Any, pools: list[LeanPool]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
        await read_request(reader)
        writer.write(answer(b"conn %d" % i))  # keep-alive, then a silent close

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    assert await (await pool.request("POST", "/", b"x")).read() == b"conn 0"
    for _ in range(100):  # until the close has arrived
        if pool.idle == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.idle == 0
    assert await (await pool.request("POST", "/", b"x")).read() == b"conn 1"


async def test_reused_connection_closed_at_send_is_stale_then_sent_fresh(
        raw_server: Any, pools: list[LeanPool]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
        await read_request(reader)
        if i == 0:
            writer.write(answer(b"first"))
            await read_request(reader)  # the second request arrives: close without a word
            return
        writer.write(answer(b"fresh"))

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    assert await (await pool.request("POST", "/", b"x")).read() == b"first"
    with pytest.raises(StaleConnection) as caught:  # the caller decides to send it again
        await pool.request("POST", "/", b"y")
    assert caught.value.stage == "send"
    assert await (await pool.request("POST", "/", b"y", fresh=True)).read() == b"fresh"
    assert pool.opened == 2


async def test_new_connection_closed_before_answer_fails(raw_server: Any,
                                                         pools: list[LeanPool]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    with pytest.raises(LeanError) as caught:
        await pool.request("POST", "/", b"x")
    assert caught.value.stage == "send"
    assert raw.connections == 1  # no retry on a connection that was never reused


async def test_answer_broken_off_mid_body(raw_server: Any, pools: list[LeanPool]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    response = await pool.request("POST", "/", b"x")
    with pytest.raises(LeanError) as caught:
        await response.read()
    assert caught.value.stage == "body"


async def test_malformed_answer(raw_server: Any, pools: list[LeanPool]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n"
                     b"\r\n1\r\nx\r\n0\r\n\r\n")
        await asyncio.sleep(1)

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    with pytest.raises(LeanError, match="malformed"):
        await asyncio.wait_for(pool.request("POST", "/", b"x"), 0.5)


async def test_first_byte_and_idle_timeouts(raw_server: Any, pools: list[LeanPool]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
        await read_request(reader)
        if i == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfive.")
        await asyncio.sleep(2)

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    with pytest.raises(TimeoutError):
        await pool.request("POST", "/", b"x", first_byte=0.1)
    response = await pool.request("POST", "/", b"x", first_byte=1, idle=0.1)
    with pytest.raises(TimeoutError):
        await response.read()
    assert pool.idle == 0  # neither connection goes back


async def test_idle_bounds_each_gap_not_the_whole_stream(raw_server: Any,
                                                         pools: list[LeanPool]) -> None:
    """One timer per connection, armed lazily: chunks 50 ms apart for 0.6 s pass an idle of
    0.2 s; the stall after them ends the read about 0.2 s after the last chunk, though the
    first-byte bound armed before was 5 s; ``total`` ends a stream that keeps sending."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(12 if i == 0 else 100):
            await asyncio.sleep(0.05)
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
        await asyncio.sleep(3)

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    loop = asyncio.get_running_loop()
    response = await pool.request("POST", "/", b"x", first_byte=5, idle=0.2)
    got, last = b"", 0.0
    with pytest.raises(TimeoutError) as caught:
        async for chunk in response.chunks():
            got, last = got + chunk, loop.time()
    assert type(caught.value).__name__ == "IdleTimeout"
    assert got == b"x" * 12
    assert 0.15 < loop.time() - last < 1.0
    started = loop.time()
    response = await pool.request("POST", "/", b"x", first_byte=5, idle=0.2, total=0.5)
    with pytest.raises(TimeoutError):
        await response.read()
    assert 0.4 < loop.time() - started < 1.5


async def test_refused_connection(pools: list[LeanPool]) -> None:
    port = await closed_port()
    pool = pool_for(port, pools)
    with pytest.raises(LeanError, match="cannot connect") as caught:
        await pool.request("POST", "/", b"x")
    assert caught.value.stage == "send"


async def test_host_name_is_looked_up_once_per_ttl(raw_server: Any,
                                                   pools: list[LeanPool]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(answer(b"ok", b"Connection: close\r\n"))
        await writer.drain()

    raw = await raw_server(script)
    pool = LeanPool("localhost", raw.port)  # may resolve to ::1 first: the next address serves
    pools.append(pool)
    for _ in range(3):
        assert await (await pool.request("POST", "/", b"x")).read() == b"ok"
    assert (pool.opened, pool.lookups, raw.connections) == (3, 1, 3)
    pool.dns_ttl = 0  # expired: the next new connection looks the name up again
    assert await (await pool.request("POST", "/", b"x")).read() == b"ok"
    assert pool.lookups == 2


async def test_unreachable_name_is_looked_up_again(pools: list[LeanPool]) -> None:
    port = await closed_port()
    pool = LeanPool("localhost", port)
    pools.append(pool)
    for tries in (1, 2):
        with pytest.raises(ConnectError) as caught:
            await pool.request("POST", "/", b"x")
        assert caught.value.reason == "Connection refused"  # the system's words, no address
        assert pool.lookups == tries  # no address took the connection: none is kept


async def test_head_answer_has_no_body(raw_server: Any, pools: list[LeanPool]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while not reader.at_eof():  # a close while reading ends the script
            await read_request(reader)  # a HEAD request has an empty body
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")  # HEAD: no body
            await writer.drain()

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    for _ in range(2):
        response = await pool.request("HEAD", "/", first_byte=5, idle=5)
        assert response.status == 200 and response.header(b"content-length") == b"5"
        async with asyncio.timeout(2):  # not a wait for five bytes that never come
            assert await response.read() == b""
    assert pool.idle == 0  # the parser would take the next answer for the body: not reused


async def test_interim_answers_are_skipped(raw_server: Any, pools: list[LeanPool]) -> None:
    """103 Early Hints and 100 Continue come before the answer (whole, or in writes of their
    own); the request returns the final status and only its headers, and the connection is
    reused afterwards."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while await read_request(reader):
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                         + answer(b"first"))
            await writer.drain()
            await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(answer(b"second", b"X-Final: yes\r\n"))
            await writer.drain()

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    response = await pool.request("POST", "/", b"x", first_byte=5, idle=5)
    assert response.status == 200 and response.header(b"link") is None
    assert await response.read() == b"first"
    response = await pool.request("POST", "/", b"x", first_byte=5, idle=5)
    assert response.status == 200 and response.header(b"x-final") == b"yes"
    assert await response.read() == b"second"
    assert raw.connections == 1 and pool.idle == 1


def test_ipv6_host_header_is_bracketed() -> None:
    assert LeanPool("::1", 8000).host_header == b"[::1]:8000"
    assert LeanPool("::1", 80).host_header == b"[::1]"
    assert LeanPool("example.org", 443, tls=ssl.create_default_context()).host_header == (
        b"example.org")


async def test_large_body_pauses_reading_and_arrives_whole(raw_server: Any,
                                                           pools: list[LeanPool]) -> None:
    big = bytes(range(256)) * (4 * HIGH_WATER // 256)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while await read_request(reader):
            writer.write(answer(big))
            await writer.drain()

    raw = await raw_server(script)
    pool = pool_for(raw.port, pools)
    response = await pool.request("POST", "/", b"x")
    for _ in range(100):  # the body arrives while nobody reads: reading pauses
        if response.reading_paused:
            break
        await asyncio.sleep(0.01)
    assert response.reading_paused
    assert await response.read() == big
    again = await pool.request("POST", "/", b"x")  # the paused connection was resumed, reused
    assert await again.read() == big
    assert pool.opened == 1


def test_header_injection_is_refused() -> None:
    pool = LeanPool("127.0.0.1", 1)
    with pytest.raises(ValueError, match="X-Bad"):
        asyncio.run(pool.request("POST", "/", b"", [("X-Bad", "a\r\nInjected: 1")]))


@pytest.fixture
def certificate(tmp_path: Any) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, made by the openssl command line tool."""
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


async def test_tls_upstream(aiohttp_server: Any, pools: list[LeanPool],
                            certificate: tuple[str, str]) -> None:
    import ssl

    cert, key = certificate
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"over tls: " + await request.read())

    app = web.Application()
    app.router.add_post("/", handler)
    server = await aiohttp_server(app, ssl=server_tls)
    client_tls = ssl.create_default_context(cafile=cert)
    pool = pool_for(server.port, pools, tls=client_tls)
    for _ in range(2):
        response = await pool.request("POST", "/", b"hello")
        assert await response.read() == b"over tls: hello"
    assert pool.opened == 1
    untrusting = pool_for(server.port, pools, tls=ssl.create_default_context())
    with pytest.raises(LeanError, match="cannot connect"):
        await untrusting.request("POST", "/", b"hello")


# -- behind HTTPUpstream: the proxy's requests

async def test_the_proxy_sends_through_the_lean_pool(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI,
) -> None:
    """Answers whole and streamed come back as with aiohttp; the requests are the lean
    client's (no aiohttp User-Agent), with the credential and identity encoding."""
    config = {"backend_provider": "custom", "url": upstream_url(openai_upstream) + "/",
              "api_key": "sk-lean", "api_key_header": "Authorization",
              "model": {"name": "public"}}
    client = await start_proxy(config)
    chat = {"model": "public", "messages": [{"role": "user", "content": "hi"}]}
    resp = await client.post("/v1/chat/completions", json=chat)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["model"] == "public"
    resp = await client.post("/v1/chat/completions", json={**chat, "stream": True})
    body = await resp.read()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n")
    events = [json.loads(e[6:]) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    assert [e["model"] for e in events] == ["public"] * (fake_openai.chunks + 1)
    seen = fake_openai.seen[-2:]
    assert [s.path for s in seen] == ["/v1/chat/completions"] * 2
    for request in seen:
        assert request.headers["Authorization"] == "Bearer sk-lean"
        assert request.headers["Accept-Encoding"] == "identity"
        assert "aiohttp" not in request.headers.get("User-Agent", "")
    resp = await client.head("/v1/files/f1")  # passed through; the upstream answers no body
    assert resp.status == 200 and await resp.read() == b""
    assert fake_openai.seen[-1].method == "HEAD"
    resp = await client.post("/v1/chat/completions", json=chat)
    assert resp.status == 200 and (await resp.json())["model"] == "public"
