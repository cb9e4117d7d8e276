"""The fake Ollama answers in the shapes of Ollama's openapi.yaml and API docs."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests.fakes.ollama import FAKE_OLLAMA, FakeOllama, create_fake_ollama, embedding
from tests.fakes.openapi import problems

COUNTERS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "why is the sky blue?"}]}

ClientFactory = Any  # pytest-aiohttp's aiohttp_client fixture


async def fake_client(aiohttp_client: ClientFactory) -> tuple[TestClient[Any, Any], FakeOllama]:
    app = create_fake_ollama()
    client = await aiohttp_client(app)
    return client, app[FAKE_OLLAMA]


def ndjson(raw: bytes) -> list[dict[str, Any]]:
    assert raw.endswith(b"\n")
    return [orjson.loads(line) for line in raw.splitlines()]


def assert_final(obj: dict[str, Any]) -> None:
    assert obj["done"] is True
    for key in COUNTERS:
        assert isinstance(obj[key], int) and obj[key] > 0, key


@pytest.mark.parametrize(
    ("path", "body", "event_schema", "final_schema"),
    [
        ("/api/chat", CHAT, "ChatStreamEvent", "ChatResponse"),
        (
            "/api/generate",
            {"model": "llama3.2", "prompt": "Why?"},
            "GenerateStreamEvent",
            "GenerateResponse",
        ),
    ],
)
async def test_streams_are_ndjson_with_a_final_done_object(
    aiohttp_client: ClientFactory,
    path: str,
    body: dict[str, Any],
    event_schema: str,
    final_schema: str,
) -> None:
    client, _ = await fake_client(aiohttp_client)
    resp = await client.post(path, json=body)  # Ollama streams unless told otherwise
    assert resp.status == 200
    assert resp.content_type == "application/x-ndjson"
    lines = ndjson(await resp.read())
    assert len(lines) > 2
    for line in lines:
        assert problems(line, event_schema) == []
        assert problems(line, final_schema) == []
    assert all(line["done"] is False for line in lines[:-1])
    assert_final(lines[-1])
    assert lines[-1]["done_reason"] == "stop"


@pytest.mark.parametrize(
    ("path", "body", "schema"),
    [
        ("/api/chat", CHAT | {"stream": False}, "ChatResponse"),
        (
            "/api/generate",
            {"model": "llama3.2", "prompt": "Why?", "stream": False},
            "GenerateResponse",
        ),
    ],
)
async def test_stream_false_gives_one_object(
    aiohttp_client: ClientFactory, path: str, body: dict[str, Any], schema: str
) -> None:
    client, _ = await fake_client(aiohttp_client)
    resp = await client.post(path, json=body)
    assert resp.status == 200 and resp.content_type == "application/json"
    obj = await resp.json()
    assert problems(obj, schema) == []
    assert_final(obj)
    text = obj["message"]["content"] if path == "/api/chat" else obj["response"]
    assert text.startswith("Echo: ")


async def test_chat_tool_calls_have_object_arguments(aiohttp_client: ClientFactory) -> None:
    client, _ = await fake_client(aiohttp_client)
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    body = CHAT | {"stream": False, "tools": [tool]}
    assert problems(body, "ChatRequest") == []
    obj = await (await client.post("/api/chat", json=body)).json()
    assert problems(obj, "ChatResponse") == []
    assert obj["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "why is the sky blue?"}}}
    ]


@pytest.mark.parametrize("text", ["Why is the sky blue?", ["a", "b"]])
async def test_embed(aiohttp_client: ClientFactory, text: Any) -> None:
    client, _ = await fake_client(aiohttp_client)
    obj = await (
        await client.post(
            "/api/embed", json={"model": "all-minilm", "input": text, "dimensions": 6}
        )
    ).json()
    assert problems(obj, "EmbedResponse") == []
    texts = [text] if isinstance(text, str) else text
    assert obj["embeddings"] == [embedding(t, 6) for t in texts]
    assert obj["prompt_eval_count"] > 0


@pytest.mark.parametrize(
    ("method", "path", "body", "schema"),
    [
        ("GET", "/api/tags", None, "ListResponse"),
        ("GET", "/api/version", None, "VersionResponse"),
        ("POST", "/api/show", {"model": "llama3.2"}, "ShowResponse"),
    ],
)
async def test_model_endpoints(
    aiohttp_client: ClientFactory, method: str, path: str, body: Any, schema: str
) -> None:
    client, _ = await fake_client(aiohttp_client)
    resp = await client.request(method, path, json=body)
    assert resp.status == 200
    obj = await resp.json()
    assert problems(obj, schema) == []
    if path == "/api/tags":
        assert [m["name"] for m in obj["models"]] == ["llama3.2:latest", "all-minilm:latest"]


@pytest.mark.parametrize(
    ("knobs", "body", "status", "message"),
    [
        (
            {},
            {"model": "mistral", "messages": []},
            404,
            'model "mistral" not found, try pulling it first',
        ),
        ({}, {"messages": []}, 400, "model is required"),
        ({"fail_status": 429, "retry_after": "3"}, CHAT, 429, "something went wrong"),
        ({"fail_status": 500, "fail_message": "boom"}, CHAT, 500, "boom"),
        ({"fail_status": 503, "fail_message": "server busy"}, CHAT, 503, "server busy"),
        ({"require_authorization": "Bearer k"}, CHAT, 401, "unauthorized"),
    ],
    ids=["not pulled", "no model", "429", "500", "503", "auth"],
)
async def test_errors_are_json_error_bodies(
    aiohttp_client: ClientFactory, knobs: dict[str, Any], body: Any, status: int, message: str
) -> None:
    client, state = await fake_client(aiohttp_client)
    for key, value in knobs.items():
        setattr(state, key, value)
    resp = await client.post("/api/chat", json=body)
    assert resp.status == status
    assert resp.content_type == "application/json"
    obj = await resp.json()
    assert problems(obj, "ErrorResponse") == []
    assert obj == {"error": message}
    if "retry_after" in knobs:
        assert resp.headers["Retry-After"] == knobs["retry_after"]


async def test_fail_times_then_succeeds(aiohttp_client: ClientFactory) -> None:
    client, state = await fake_client(aiohttp_client)
    state.fail_status, state.fail_times = 503, 1
    assert (await client.post("/api/chat", json=CHAT | {"stream": False})).status == 503
    assert (await client.post("/api/chat", json=CHAT | {"stream": False})).status == 200


async def test_mid_stream_error_line_keeps_status_200(aiohttp_client: ClientFactory) -> None:
    client, state = await fake_client(aiohttp_client)
    state.error_after = 2
    resp = await client.post("/api/chat", json=CHAT)
    assert resp.status == 200
    lines = ndjson(await resp.read())
    assert len(lines) == 3
    assert lines[-1] == {"error": "an error was encountered while running the model"}


@pytest.mark.parametrize("knob", ["split_lines", "one_write", "no_final_newline"])
async def test_framing_knobs_keep_the_same_lines(aiohttp_client: ClientFactory, knob: str) -> None:
    client, state = await fake_client(aiohttp_client)
    plain = await (
        await client.post("/api/generate", json={"model": "llama3.2", "prompt": "a b c"})
    ).read()
    setattr(state, knob, True)
    raw = await (
        await client.post("/api/generate", json={"model": "llama3.2", "prompt": "a b c"})
    ).read()
    assert raw == (plain.rstrip(b"\n") if knob == "no_final_newline" else plain)
