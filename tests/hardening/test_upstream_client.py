"""The proxy's upstream client seen from the outside: the real proxy, raw-socket upstreams."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import StartProxy
from tests.fakes.raw_upstream import COMPLETION, RawRequest, RawUpstream, response
from tests.hardening.wire import CHAT, exchange, request


@pytest.fixture
async def raw_upstreams() -> AsyncIterator[list[RawUpstream]]:
    made: list[RawUpstream] = []
    yield made
    for upstream in made:
        await upstream.close()


async def started(made: list[RawUpstream], answer: Any) -> RawUpstream:
    upstream = await RawUpstream(answer).start()
    made.append(upstream)
    return upstream


def config(upstream: RawUpstream, **extra: Any) -> dict[str, Any]:
    return {"backend_provider": "custom", "url": upstream.url,
            "retries": {"attempts": 1}, **extra}


async def test_keepalive_race_costs_no_request(
        start_proxy: StartProxy, raw_upstreams: list[RawUpstream]) -> None:
    """An upstream that closes each kept-alive connection before its second answer (as
    uvicorn does to idle ones, the close crossing the next request): 1,000 requests, 64 at a
    time, every one answered. A request whose reused connection turns out closed is sent again
    on a connection opened for it, never on another pooled one (as likely to be closed)."""
    answered: set[asyncio.StreamWriter] = set()

    async def one_per_connection(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if writer in answered:  # closed meanwhile: the request is never answered
            return False
        answered.add(writer)
        writer.write(response(200, COMPLETION))  # no "Connection: close": it looks reusable
        return True

    upstream = await started(raw_upstreams, one_per_connection)
    client = await start_proxy(config(upstream, circuit={"failures": 1000}))
    statuses: dict[int, int] = {}
    queue = list(range(1000))

    async def worker() -> None:
        while queue:
            queue.pop()
            resp = await client.post("/v1/chat/completions", json=CHAT)
            await resp.read()
            statuses[resp.status] = statuses.get(resp.status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(64)))
    assert statuses == {200: 1000}


async def test_request_header_bytes_outside_ascii_are_forwarded_as_sent(
        start_proxy: StartProxy, raw_upstreams: list[RawUpstream]) -> None:
    heads: list[dict[str, str]] = []

    async def record(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if req.line.startswith("POST"):  # not the proxy's own probes
            heads.append(req.headers)  # decoded as latin-1: one character per byte
        writer.write(response(200, COMPLETION))
        return True

    upstream = await started(raw_upstreams, record)
    client = await start_proxy(config(upstream))
    url = str(client.make_url("")).rstrip("/")
    raw = request("POST", "/v1/chat/completions", COMPLETION_REQUEST).replace(
        b"Content-Type: application/json", b"Content-Type: application/json; x=\xff\xfe"
    ).replace(b"Connection: close\r\n", b"Connection: close\r\nAccept: \xe9\xff\r\n"
              b"traceparent: 00-\x80\x81-01\r\ntracestate: a=\xff\xfe\r\n")
    status, _, body = await exchange(url, raw)
    assert status == 200, body
    assert heads, body
    sent = {name: value.encode("latin-1") for name, value in heads[-1].items()}
    assert sent["tracestate"] == b"a=\xff\xfe"
    assert sent["accept"] == b"\xe9\xff"
    assert sent["traceparent"] == b"00-\x80\x81-01"
    # the body was read as JSON: it goes on as JSON, whatever the client called it
    assert sent["content-type"] == b"application/json"


COMPLETION_REQUEST = CHAT


async def test_switching_protocols_is_a_502_with_nothing_logged_but_the_note(
        start_proxy: StartProxy, raw_upstreams: list[RawUpstream],
        caplog: pytest.LogCaptureFixture) -> None:
    async def upgrade(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n\x81\x05hello")
        return True

    upstream = await started(raw_upstreams, upgrade)
    client = await start_proxy(config(upstream))
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            resp = await client.post("/v1/chat/completions", json=CHAT)
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_upgrade"
        await asyncio.sleep(0)
    assert all(record.exc_info is None for record in caplog.records)
    assert not [r for r in caplog.records if "Fatal error" in r.getMessage()]


@pytest.mark.parametrize("status", [b"99", b"600", b"999", b"000"])
async def test_status_outside_100_to_599_is_a_502(
        start_proxy: StartProxy, raw_upstreams: list[RawUpstream], status: bytes) -> None:
    async def odd(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(200, COMPLETION).replace(b"HTTP/1.1 200", b"HTTP/1.1 " + status))
        return True

    upstream = await started(raw_upstreams, odd)
    client = await start_proxy(config(upstream, timeouts={"total": 60, "first_byte": 60}))
    resp = await asyncio.wait_for(client.post("/v1/chat/completions", json=CHAT), 30)
    assert resp.status == 502
    assert "malformed answer" in (await resp.json())["error"]["message"]


async def test_a_header_flood_is_a_502(start_proxy: StartProxy,
                                       raw_upstreams: list[RawUpstream]) -> None:
    async def flood(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for block in range(50):
            writer.write(b"".join(b"X-F-%d-%d: v\r\n" % (block, i) for i in range(2_000)))
            await writer.drain()
        writer.write(b"Content-Length: 0\r\n\r\n")
        return False

    upstream = await started(raw_upstreams, flood)
    client = await start_proxy(config(upstream))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 502
    assert "header fields" in (await resp.json())["error"]["message"]


async def test_a_signed_job_sent_again_is_signed_afresh(
        start_proxy: StartProxy, raw_upstreams: list[RawUpstream]) -> None:
    """A Function Network job whose kept-alive connection died unanswered goes again with a
    new nonce and signature: the network's node would refuse the first copy's as a replay."""
    answered: set[asyncio.StreamWriter] = set()

    async def one_per_connection(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if writer in answered:
            return False
        answered.add(writer)
        writer.write(response(200, COMPLETION))
        return True

    upstream = await started(raw_upstreams, one_per_connection)
    key = "0x" + "5c" * 31 + "01"
    client = await start_proxy({"backend_provider": "fxn", "url": upstream.url, "fxn_id": "m",
                                "fxn": {"private_key": key}, "retries": {"attempts": 1}})
    for _ in range(4):
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200, await resp.text()
    posts = [r for r in upstream.seen if r.line.startswith("POST")]
    assert len(posts) > 4  # some were sent twice: once on a dead connection, once fresh
    nonces = [r.headers["x-nonce"] for r in posts]
    signatures = [r.headers["x-signature"] for r in posts]
    assert len(set(nonces)) == len(posts) and len(set(signatures)) == len(posts)
