"""Processes the benchmarks start: fake OpenAI upstreams and a bare aiohttp pass-through proxy.

    python -m bench.servers upstream PORT        # aiohttp upstream (bench.instructions, overhead)
    python -m bench.servers fast PORT            # asyncio + httptools upstream (python -m bench)
    python -m bench.servers bare PORT UPSTREAM   # the baseline pass-through proxy
    python -m bench.servers bare-lean PORT UPSTREAM   # the same on proxy.adapters.lean

The fast upstream answers in a fraction of the proxy's CPU time, so it can share a core with the
load generator. Its streamed answers are shaped by the request's ``stop`` field (one that every
proxy passes on; LiteLLM drops ``user``): ``"stop": ["bench:chunks=20:delay=20"]`` sends 20
content events 20 ms apart (the first at once), then a final event with ``finish_reason`` and
``usage``, then ``[DONE]``. Without it, a streamed answer is :data:`EVENTS`, the same bytes the
aiohttp upstream sends.
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import cast

import aiohttp
import httptools
import orjson
import uvloop
from aiohttp import web

ANSWER = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench-upstream",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 40},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52},
})
EVENTS = [
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
    b'"model":"bench-upstream","choices":[{"index":0,"delta":{"content":" word"},'
    b'"finish_reason":null}]}\n\n'
] * 16
#: Sent before ``[DONE]`` when the request asks for it (``stream_options.include_usage``).
USAGE_EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
    b'"model":"bench-upstream","choices":[],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28}}\n\n'
)


async def upstream(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if b'"stream":true' not in body:
        return web.Response(body=ANSWER, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in EVENTS:
        await response.write(event)
    if b'"include_usage":true' in body:
        await response.write(USAGE_EVENT)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


_SHAPE = re.compile(rb'"stop":\s*\[?\s*"bench:chunks=(\d+)(?::delay=(\d+))?"')
_CHUNK = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
          b'"model":"bench-upstream","choices":[{"index":0,"delta":{"content":" word"},'
          b'"finish_reason":null}]}\n\n')
_FINAL = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
          b'"model":"bench-upstream","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":12,"completion_tokens":%d,"total_tokens":%d}}\n\n')
_JSON_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(ANSWER))
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
             b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def stream_events(body: bytes) -> tuple[list[bytes], float]:
    """The events of a streamed answer to ``body``, and the seconds between them."""
    shape = _SHAPE.search(body)
    if shape is None:
        return EVENTS, 0.0
    chunks = int(shape.group(1))
    delay = int(shape.group(2) or 0) / 1000
    return [_CHUNK] * chunks + [_FINAL % (chunks, chunks + 12), b"data: [DONE]\n\n"], delay


def _chunked(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


class FastUpstream(asyncio.Protocol):
    """One connection of the fast upstream: HTTP/1.1 keep-alive, parsed by llhttp."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        assert transport is not None
        body = b"".join(self.body)
        self.body = []
        if self.parser.get_method() != b"POST" or not self.url.endswith(b"/chat/completions"):
            transport.write(_NOT_FOUND)
        elif b'"stream":true' not in body and b'"stream": true' not in body:
            transport.write(_JSON_HEAD + ANSWER)
        else:
            events, delay = stream_events(body)
            if delay:
                asyncio.get_running_loop().create_task(self.slow_stream(events, delay))
                return
            transport.write(_SSE_HEAD)
            for event in events:
                transport.write(_chunked(event))
            transport.write(b"0\r\n\r\n")
        if not self.parser.should_keep_alive():
            transport.close()

    async def slow_stream(self, events: list[bytes], delay: float) -> None:
        transport = self.transport
        assert transport is not None
        keep_alive = self.parser.should_keep_alive()
        transport.write(_SSE_HEAD + _chunked(events[0]))
        for event in events[1:]:
            await asyncio.sleep(delay)
            if transport.is_closing():
                return
            transport.write(_chunked(event))
        transport.write(b"0\r\n\r\n")
        if not keep_alive:
            transport.close()


async def serve_fast(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FastUpstream, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def bare_app(upstream_url: str) -> web.Application:
    """The baseline: what a minimal aiohttp pass-through proxy does, and nothing more."""
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app[session_key].post(
            upstream_url + request.path, data=body,
            headers={"Content-Type": "application/json"},
        ) as up:
            if up.content_type != "text/event-stream":
                return web.Response(status=up.status, body=await up.read(),
                                    content_type=up.content_type)
            response = web.StreamResponse(status=up.status,
                                          headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[session_key].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", forward)
    return app


def bare_lean_app(upstream_url: str) -> web.Application:
    """The baseline with the lean upstream client in place of ClientSession."""
    from urllib.parse import urlsplit

    from proxy.adapters.lean import LeanPool

    parts = urlsplit(upstream_url)
    pool_key = web.AppKey("pool", LeanPool)
    headers = [("Content-Type", "application/json")]

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        up = await request.app[pool_key].request("POST", request.path, body, headers,
                                                 first_byte=120, idle=60)
        content_type = (up.header(b"content-type") or b"").decode()
        if not content_type.startswith("text/event-stream"):
            return web.Response(status=up.status, body=await up.read(),
                                content_type=content_type.split(";")[0] or None)
        response = web.StreamResponse(status=up.status,
                                      headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for chunk in up.chunks():
            await response.write(chunk)
        await response.write_eof()
        return response

    async def pool_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[pool_key] = LeanPool(parts.hostname or "127.0.0.1", parts.port or 80)
        yield
        await app[pool_key].close()

    app = web.Application()
    app.cleanup_ctx.append(pool_ctx)
    app.router.add_post("/v1/chat/completions", forward)
    return app


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "fast":
        uvloop.run(serve_fast(port))
        return
    if kind == "upstream":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", upstream)
    elif kind == "bare-lean":
        app = bare_lean_app(sys.argv[3])
    else:
        app = bare_app(sys.argv[3])
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096,
                handler_cancellation=True)


if __name__ == "__main__":
    main()
