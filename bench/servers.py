"""Processes the benchmark starts: a fast fake upstream and a bare aiohttp pass-through proxy.

Run as ``python -m bench.servers upstream PORT`` or ``python -m bench.servers bare PORT UPSTREAM``.
"""

from __future__ import annotations

import sys

import aiohttp
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
] * 16 + [b"data: [DONE]\n\n"]


async def upstream(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if b'"stream":true' not in body:
        return web.Response(body=ANSWER, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in EVENTS:
        await response.write(event)
    await response.write_eof()
    return response


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


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "upstream":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", upstream)
    else:
        app = bare_app(sys.argv[3])
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                handler_cancellation=True)


if __name__ == "__main__":
    main()
