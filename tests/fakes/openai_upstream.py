"""A fake OpenAI-compatible server that speaks the real wire format (JSON and SSE).

Every request is recorded (method, path, query, headers, body) so tests can check exactly
what the proxy sent. Knobs on ``FakeOpenAI`` shape the next answers.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeOpenAI:
    seen: list[Seen] = field(default_factory=list)
    #: Answer the next requests with this status and JSON body instead of a completion.
    fail_status: int | None = None
    fail_body: Any = None
    fail_times: int = 0
    #: Seconds between SSE events.
    event_delay: float = 0.0
    #: Number of content chunks in a streamed answer.
    chunks: int = 3
    #: Set when a streamed answer's client went away before the end.
    stream_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    stream_finished: asyncio.Event = field(default_factory=asyncio.Event)
    #: Further fields of the one model ``/v1/models`` lists (e.g. vLLM's ``max_model_len``).
    model_fields: dict[str, Any] = field(default_factory=dict)
    #: The model name every answer gives (as llama.cpp's server does); None: the one asked for.
    answer_model: str | None = None
    #: Whether answers report usage (streams: when ``stream_options.include_usage`` asks).
    usage: bool = True

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completion)
        app.router.add_post("/v1/completions", self.completion)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/v1/{tail:.*}", self.echo)
        return app

    async def record(self, request: web.Request) -> Seen:
        seen = Seen(
            request.method,
            request.path,
            request.query_string,
            dict(request.headers),
            await request.read(),
        )
        self.seen.append(seen)
        return seen

    def failure(self) -> web.Response | None:
        if self.fail_status is None or self.fail_times == 0:
            return None
        self.fail_times -= 1
        return web.json_response(
            self.fail_body, status=self.fail_status, headers={"X-Upstream-Detail": "kept"}
        )

    async def completion(self, request: web.Request) -> web.StreamResponse:
        seen = await self.record(request)
        failed = self.failure()
        if failed is not None:
            return failed
        payload = seen.json()
        model = self.answer_model or payload.get("model")
        counts = {"prompt_tokens": 3, "completion_tokens": self.chunks,
                  "total_tokens": 3 + self.chunks}
        chat = request.path.endswith("chat/completions")
        words = [f"w{i}" for i in range(self.chunks)]
        if not payload.get("stream"):
            text = " ".join(words)
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            )
            answer = {
                "id": "cmpl-fake",
                "object": "chat.completion" if chat else "text_completion",
                "created": 1,
                "model": model,
                "choices": [choice],
            }
            if self.usage:
                answer["usage"] = counts
            return web.json_response(
                answer,
                headers={
                    "Set-Cookie": "upstream=secret",
                    "Server": "fake/1.0",
                    "X-Upstream-Detail": "kept",
                },
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i, word in enumerate(words):
                word = f" {word}" if i else word
                delta = {"content": word} if i else {"role": "assistant", "content": word}
                choice = (
                    {"index": 0, "delta": delta, "finish_reason": None}
                    if chat
                    else {"index": 0, "text": word, "finish_reason": None}
                )
                event = {
                    "id": "cmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": model,
                    "choices": [choice],
                }
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
                if self.event_delay:
                    await asyncio.sleep(self.event_delay)
            final = {
                "id": "cmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [
                    {"index": 0, "delta": {}, "finish_reason": "stop"}
                    if chat
                    else {"index": 0, "text": "", "finish_reason": "stop"}
                ],
            }
            await response.write(f"data: {json.dumps(final)}\n\n".encode())
            options = payload.get("stream_options") or {}
            if self.usage and options.get("include_usage"):
                last = {"id": "cmpl-fake", "object": "chat.completion.chunk", "created": 1,
                        "model": model, "choices": [], "usage": counts}
                await response.write(f"data: {json.dumps(last)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.stream_finished.set()
        except (asyncio.CancelledError, ConnectionResetError):
            self.stream_cancelled.set()
            raise
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        seen = await self.record(request)
        failed = self.failure()
        if failed is not None:
            return failed
        payload = seen.json()
        inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
        answer = {
            "object": "list",
            "model": self.answer_model or payload.get("model"),
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.5, -0.5, float(i)]}
                for i in range(len(inputs))
            ],
        }
        if self.usage:
            answer["usage"] = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        return web.json_response(answer)

    async def models(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": "upstream-build-7b-q4",
                        "object": "model",
                        "created": 1,
                        "owned_by": "fake",
                        **self.model_fields,
                    },
                ],
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(text="")

    async def echo(self, request: web.Request) -> web.Response:
        seen = await self.record(request)
        return web.json_response(
            {
                "echo": request.path,
                "method": request.method,
                "query": request.query_string,
                "body": seen.body.decode(),
            }
        )
