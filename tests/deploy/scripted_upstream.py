"""An OpenAI-compatible upstream whose answer is chosen by the last message's content.

One cue per request, so concurrent requests each get their own behaviour (a plan in order, as
in ``tests.fakes.faulty_upstream``, cannot say which concurrent request gets what):

``ok`` a completion; ``stream`` three SSE chunks; ``slow_first_token`` SSE whose first chunk
comes after ``first_token_delay``; ``long_stream`` chunks ``chunk_gap`` apart for
``long_chunks`` chunks (it holds a concurrency slot that long); ``fail`` a 500; ``busy`` a
503 (retried by the proxy); ``stall`` no status line for ``stall_seconds``. ``GET /health``
answers 200, as ``vllm serve`` does (the proxy's readiness probe of a vllm upstream).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web


def _chunk(content: str, finish: str | None = None) -> bytes:
    event = {"id": "s", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
    return f"data: {json.dumps(event)}\n\n".encode()


@dataclass
class ScriptedUpstream:
    first_token_delay: float = 6.0
    chunk_gap: float = 0.5
    long_chunks: int = 8
    stall_seconds: float = 4.0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completion)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def completion(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        cue = body["messages"][-1]["content"]
        if cue == "fail":
            return _error(500)
        if cue == "busy":
            return _error(503)
        if cue == "stall":
            await asyncio.sleep(self.stall_seconds)
        if cue in ("ok", "stall"):
            return web.json_response({
                "id": "s", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if cue == "slow_first_token":
            await asyncio.sleep(self.first_token_delay)
        count = self.long_chunks if cue == "long_stream" else 3
        for i in range(count):
            await response.write(_chunk(f"w{i}"))
            if cue == "long_stream":
                await asyncio.sleep(self.chunk_gap)
        await response.write(_chunk("", "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _error(status: int) -> web.Response:
    return web.json_response(
        {"error": {"message": f"scripted {status}", "type": "server_error", "param": None,
                   "code": None}}, status=status)
