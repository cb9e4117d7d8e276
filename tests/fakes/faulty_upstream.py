"""An OpenAI-ish upstream that misbehaves on cue, for fault-injection tests.

``Faulty.plan`` is a list of behaviours, one per request in order (the last one repeats);
each is a name from ``Faulty.BEHAVIOURS`` or a ``(status, headers)`` pair answered as an
OpenAI error body. ``attempts`` counts the requests that reached it. It is a real
``web.Application`` on a real socket: resets, stalls and truncated bodies happen on the wire.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Behaviour = str | tuple[int, dict[str, str]]
#: Longest a stalling behaviour waits; far beyond every timeout the tests configure.
STALL_SECONDS = 30.0


def event(content: str) -> bytes:
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


COMPLETION = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                           "finish_reason": "stop"}]}


@dataclass
class Faulty:
    plan: list[Behaviour] = field(default_factory=lambda: ["ok"])
    attempts: int = 0
    #: Seconds the ``slow`` behaviours take.
    delay: float = 0.5
    #: Events in an ``ok`` stream; ``event_delay`` apart.
    events: int = 3
    event_delay: float = 0.0

    BEHAVIOURS = ("ok", "slow", "reset_before_answer", "reset_mid_body", "no_first_byte",
                  "stall_mid_stream", "malformed", "no_terminator", "fail_after_first_chunk")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.answer)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        index = min(self.attempts, len(self.plan) - 1)
        self.attempts += 1
        behaviour = self.plan[index]
        stream = bool(body.get("stream"))
        if isinstance(behaviour, tuple):
            status, headers = behaviour
            return web.json_response(
                {"error": {"message": f"upstream {status}", "type": "x", "param": None,
                           "code": status}}, status=status, headers=headers)
        return await getattr(self, "do_" + behaviour)(request, stream)

    async def do_ok(self, request: web.Request, stream: bool) -> web.StreamResponse:
        if not stream:
            return web.json_response(COMPLETION)
        response = await self._sse(request)
        for i in range(self.events):
            await response.write(event(f"w{i}"))
            if self.event_delay:
                await asyncio.sleep(self.event_delay)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def do_slow(self, request: web.Request, stream: bool) -> web.StreamResponse:
        await asyncio.sleep(self.delay)
        return await self.do_ok(request, stream)

    async def do_reset_before_answer(self, request: web.Request, stream: bool) -> web.Response:
        _abort(request)
        return web.Response()

    async def do_reset_mid_body(self, request: web.Request, stream: bool) -> web.StreamResponse:
        if stream:
            response = await self._sse(request)
            await response.write(event("a"))
        else:
            response = web.StreamResponse(headers={"Content-Type": "application/json",
                                                   "Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b'{"id": "x", "choi')
        await asyncio.sleep(0.05)
        _abort(request)
        return response

    async def do_no_first_byte(self, request: web.Request, stream: bool) -> web.Response:
        await asyncio.sleep(STALL_SECONDS)
        return web.json_response(COMPLETION)

    async def do_stall_mid_stream(self, request: web.Request, stream: bool) -> web.StreamResponse:
        response = await self._sse(request)
        await response.write(event("a"))
        await asyncio.sleep(STALL_SECONDS)
        return response

    async def do_malformed(self, request: web.Request, stream: bool) -> web.StreamResponse:
        if not stream:
            return web.Response(body=b'{"choices": [ {"mess', content_type="application/json")
        response = await self._sse(request)
        await response.write(b"data: {not json at all\n\nevent without data\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def do_no_terminator(self, request: web.Request, stream: bool) -> web.StreamResponse:
        # Chunked encoding, then a clean close without the final zero-length chunk.
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream" if stream else "application/json"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(event("a") if stream else b'{"id": "x"')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response

    async def do_fail_after_first_chunk(
        self, request: web.Request, stream: bool
    ) -> web.StreamResponse:
        response = await self._sse(request)
        await response.write(event("first"))
        await asyncio.sleep(0.05)
        _abort(request)
        return response

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        return response

    def with_plan(self, *plan: Behaviour) -> Faulty:
        self.plan = list(plan)
        self.attempts = 0
        return self


def _abort(request: web.Request) -> None:
    transport = request.transport
    assert transport is not None
    transport.abort()


def sse_events(raw: bytes) -> list[Any]:
    """The ``data:`` payloads of an SSE body; undecodable ones as raw strings."""
    events: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            try:
                events.append(json.loads(data) if data != "[DONE]" else data)
            except ValueError:
                events.append(data)
    return events
