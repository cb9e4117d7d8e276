"""Malformed requests: each one a 4xx OpenAI-shaped error, never a 500, the server unharmed."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import StartProxy

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
LIMITS = {"max_body_bytes": 65536, "max_messages": 8, "max_header_bytes": 2048,
          "max_json_depth": 16}
CONFIG = {"backend_provider": "mock", "limits": LIMITS}
GOOD_CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


class Case(NamedTuple):
    name: str
    path: str
    body: bytes
    status: int
    headers: dict[str, str] | None = None
    method: str = "POST"


def chat(**fields: Any) -> bytes:
    return json.dumps({**GOOD_CHAT, **fields}).encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CASES = [
    Case("truncated JSON", CHAT, b'{"model": "mock-model", "messages": [', 400),
    Case("empty body", CHAT, b"", 400),
    Case("top-level array", CHAT, b"[]", 400),
    Case("top-level string", CHAT, b'"hello"', 400),
    Case("top-level null", CHAT, b"null", 400),
    Case("model missing", CHAT, b'{"messages": [{"role": "user", "content": "x"}]}', 400),
    Case("model a number", CHAT, chat(model=123), 400),
    Case("model empty", CHAT, chat(model=""), 400),
    Case("model 10k characters", CHAT, chat(model="m" * 10_000), 400),
    Case("messages missing", CHAT, b'{"model": "mock-model"}', 400),
    Case("messages a string", CHAT, chat(messages="hello"), 400),
    Case("messages empty", CHAT, chat(messages=[]), 400),
    Case("message a string", CHAT, chat(messages=["hello"]), 400),
    Case("message without role", CHAT, chat(messages=[{"content": "x"}]), 400),
    Case("role a number", CHAT, chat(messages=[{"role": 7, "content": "x"}]), 400),
    Case("content an object", CHAT, chat(messages=[{"role": "user", "content": {"a": 1}}]), 400),
    Case("content parts numbers", CHAT, chat(messages=[{"role": "user", "content": [1, 2]}]), 400),
    Case("too many messages", CHAT,
         chat(messages=[{"role": "user", "content": "x"}] * 9), 400),
    Case("stream a string", CHAT, chat(stream="yes"), 400),
    Case("max_tokens a string", CHAT, chat(max_tokens="10"), 400),
    Case("max_tokens negative", CHAT, chat(max_tokens=-1), 400),
    Case("max_tokens 10^30", CHAT, chat(max_tokens=10**30), 400),
    Case("temperature a string", CHAT, chat(temperature="hot"), 400),
    Case("temperature 1e400", CHAT, chat().replace(b'"mock-model"', b'"mock-model", '
                                                     b'"temperature": 1e400'), 400),
    Case("temperature NaN", CHAT, chat().replace(b'"mock-model"', b'"mock-model", '
                                                  b'"temperature": NaN'), 400),
    Case("top_p 5", CHAT, chat(top_p=5), 400),
    Case("n a million", CHAT, chat(n=1_000_000), 400),
    Case("seed a fraction", CHAT, chat(seed=1.5), 400),
    Case("stop a number", CHAT, chat(stop=123), 400),
    Case("stop numbers", CHAT, chat(stop=[1, 2]), 400),
    Case("tools a string", CHAT, chat(tools="all"), 400),
    Case("stream_options a string", CHAT, chat(stream=True, stream_options="x"), 400),
    Case("response_format a string", CHAT, chat(response_format="json"), 400),
    Case("nested past the depth limit", CHAT,
         chat().replace(b'"mock-model"', f'"mock-model", "x": {nested(40)}'.encode()), 400),
    Case("nested 30k deep", CHAT, nested(30_000).encode(), 400),
    Case("invalid UTF-8", CHAT, chat().replace(b'"hi"', b'"h\xff\xfei"'), 400),
    Case("lone surrogate", CHAT, chat().replace(b'"hi"', b'"\\ud800"'), 400),
    Case("byte order mark", CHAT, b"\xef\xbb\xbf" + chat(), 400),
    Case("two documents", CHAT, chat() + b"{}", 400),
    Case("body over the limit", CHAT, chat(messages=[{"role": "user", "content": "x" * 70_000}]),
         413),
    Case("headers over the limit", CHAT, chat(), 431,
         headers={f"X-Pad-{i}": "p" * 900 for i in range(3)}),
    Case("prompt a number", COMPLETIONS, b'{"model": "mock-model", "prompt": 5}', 400),
    Case("prompt empty list", COMPLETIONS, b'{"model": "mock-model", "prompt": []}', 400),
    Case("prompt mixed tokens", COMPLETIONS, b'{"model": "mock-model", "prompt": [[1, "a"]]}',
         400),
    Case("prompt missing", COMPLETIONS, b'{"model": "mock-model"}', 400),
    Case("input an object", EMBEDDINGS, b'{"model": "mock-model", "input": {}}', 400),
    Case("input nulls", EMBEDDINGS, b'{"model": "mock-model", "input": [null]}', 400),
    Case("negative token id", EMBEDDINGS, b'{"model": "mock-model", "input": [-5]}', 400),
    Case("GET on a POST endpoint", CHAT, b"", 405, method="GET"),
    Case("unknown path", "/v1/does-not-exist", b"{}", 404),
]


async def send(client: TestClient[Any, Any], case: Case) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **(case.headers or {})}
    resp = await client.request(case.method, case.path, data=case.body, headers=headers)
    text = await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json"), (case.name, text[:200])
    return resp.status, json.loads(text)


def assert_openai_error(case: Case, status: int, answer: Any) -> None:
    assert status == case.status, (case.name, status, answer)
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}, case.name
    assert isinstance(error["message"], str) and error["message"], case.name
    assert "Traceback" not in error["message"], case.name


async def still_serving(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    resp = await client.post(CHAT, json=GOOD_CHAT)
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"]


def test_suite_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_input(start_proxy: StartProxy, case: Case) -> None:
    client = await start_proxy(CONFIG)
    status, answer = await send(client, case)
    assert_openai_error(case, status, answer)
    await still_serving(client)


async def test_all_in_a_row_then_still_serving(start_proxy: StartProxy) -> None:
    client = await start_proxy(CONFIG)
    for case in CASES:
        assert_openai_error(case, *await send(client, case))
    await still_serving(client)
    metrics = await (await client.get("/metrics")).text()
    assert not re.search(r'model_proxy_requests_total\{[^}]*status="5\d\d"', metrics)


async def test_chunked_body_over_the_limit(start_proxy: StartProxy) -> None:
    client = await start_proxy(CONFIG)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "mock-model", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}]}'

    resp = await client.post(CHAT, data=chunks())
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"
    await still_serving(client)


async def test_header_beyond_what_the_parser_takes(start_proxy: StartProxy) -> None:
    # A single header larger than the HTTP parser's field limit never reaches a handler;
    # aiohttp answers it (plain text), still a 4xx, and the server carries on.
    client = await start_proxy(CONFIG)
    resp = await client.post(CHAT, json=GOOD_CHAT, headers={"X-Huge": "h" * 20_000})
    assert 400 <= resp.status < 500
    await still_serving(client)
