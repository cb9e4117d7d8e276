"""A FastAPI upstream (vLLM's OpenAI server is one) reads a body by its ``Content-Type``: the
proxy reads an inference body as JSON whatever the client called it, so it says so upstream.

The upstream is a real FastAPI app with a pydantic request model, served by uvicorn on
127.0.0.1 in a thread of its own.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import uvicorn
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict

from tests.conftest import StartProxy


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message]


def fastapi_app(seen: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> dict[str, Any]:
        seen.append(request.headers.get("content-type", ""))
        return {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": body.messages[-1].content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app


@pytest.fixture
def fastapi_upstream() -> Iterator[tuple[str, list[str]]]:
    """The upstream's base URL, and the ``Content-Type`` of each request it parsed."""
    seen: list[str] = []
    # bound here, so that connections wait in its backlog until uvicorn accepts them
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(fastapi_app(seen), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


BODY = {"model": "llama3", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.mark.parametrize("client_type", [
    "application/x-www-form-urlencoded",  # what curl -d sends when told nothing
    None,
    "text/plain",
    "application/json; charset=utf-8",
])
async def test_a_json_body_reaches_fastapi_as_json_whatever_the_client_said(
    start_proxy: StartProxy, fastapi_upstream: tuple[str, list[str]], client_type: str | None
) -> None:
    url, seen = fastapi_upstream
    client = await start_proxy({"backend_provider": "custom", "url": url,
                                "model_name_alias": "served-upstream"})
    headers = {} if client_type is None else {"Content-Type": client_type}
    resp = await client.post("/v1/chat/completions", data=orjson.dumps(BODY), headers=headers)
    answer = await resp.json()
    assert resp.status == 200, answer
    assert answer["choices"][0]["message"]["content"] == "Hello"
    assert seen == ["application/json"]
