"""The real ``openai`` package, sync and async, against the proxy in front of a fake Ollama."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import build_config
from proxy.server.health import probe
from tests.conftest import StartProxy, upstream_url
from tests.fakes.ollama import FakeOllama, embedding

MESSAGES: Any = [{"role": "user", "content": "why is the sky blue?"}]
ANSWER = "Echo: why is the sky blue?"
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
def fake_ollama() -> FakeOllama:
    return FakeOllama()


@pytest.fixture
async def proxy(
    start_proxy: StartProxy, aiohttp_server: Any, fake_ollama: FakeOllama
) -> TestClient:
    server: TestServer = await aiohttp_server(fake_ollama.app())
    return await start_proxy(
        {
            "backend_provider": "ollama",
            "url": upstream_url(server),
            "api_key": "sk-ollama-test",
            "model_name_alias": "llama3.2:latest",
            "model": {"name": "llama-public", "aliases": ["llama"]},
            "ollama": {"options": {"num_ctx": 2048}, "keep_alive": "5m"},
        }
    )


def client_for(proxy: TestClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key="unused", max_retries=0)


async def test_chat_completions_embeddings_models(
    proxy: TestClient, fake_ollama: FakeOllama
) -> None:
    async with client_for(proxy) as client:
        chat = await client.chat.completions.create(
            model="llama-public", messages=MESSAGES, temperature=0, seed=7, max_tokens=100
        )
        assert chat.model == "llama-public"
        assert chat.id.startswith("chatcmpl-")
        assert chat.choices[0].message.content == ANSWER
        assert chat.choices[0].finish_reason == "stop"
        assert chat.usage is not None and chat.usage.completion_tokens == 6
        sent = fake_ollama.requests[-1]
        assert sent.path == "/api/chat" and sent.body["model"] == "llama3.2:latest"
        assert sent.body["options"] == {
            "num_ctx": 2048,
            "temperature": 0,
            "top_p": 1.0,  # absent from the request: OpenAI's default, as Ollama's /v1 sends
            "seed": 7,
            "num_predict": 100,
        }
        assert sent.headers["Authorization"] == "Bearer sk-ollama-test"

        aliased = await client.chat.completions.create(model="llama", messages=MESSAGES)
        assert aliased.model == "llama"

        completion = await client.completions.create(
            model="llama-public", prompt="Once upon a time", max_tokens=2, stop=["\n"]
        )
        assert completion.choices[0].text == "Echo: Once "
        assert completion.choices[0].finish_reason == "length"

        # The client asks for base64 and decodes it itself unless given an encoding.
        expected = [embedding("a b", 4), embedding("c", 4)]
        for encoding in (openai.omit, "float", "base64"):
            emb = await client.embeddings.create(
                model="llama-public", input=["a b", "c"], dimensions=4, encoding_format=encoding
            )
            assert emb.usage.prompt_tokens > 0 and emb.model == "llama-public"
            for item, want in zip(emb.data, expected, strict=True):
                got: Any = item.embedding
                if encoding == "base64":
                    raw = base64.b64decode(got)
                    got = struct.unpack(f"<{len(raw) // 4}f", raw)
                assert list(got) == pytest.approx(want, rel=1e-6)

        models = await client.models.list()
        assert [m.id for m in models.data] == ["llama-public"]


async def test_streaming_with_usage(proxy: TestClient) -> None:
    async with client_for(proxy) as client:
        stream = await client.chat.completions.create(
            model="llama-public",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert {c.model for c in chunks} == {"llama-public"}
    metrics = await (await proxy.get("/metrics")).text()
    assert 'model_proxy_tokens_total{direction="out"} 6.0' in metrics


async def test_tools(proxy: TestClient) -> None:
    async with client_for(proxy) as client:
        chat = await client.chat.completions.create(
            model="llama-public",
            messages=[{"role": "user", "content": "Tokyo"}],
            tools=[WEATHER],
        )
        choice = chat.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls or []
        assert len(calls) == 1 and calls[0].id.startswith("call_")
        call = calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Tokyo"}

        assistant: Any = choice.message.model_dump(exclude_none=True)
        follow_up = await client.chat.completions.create(
            model="llama-public",
            messages=[
                {"role": "user", "content": "Tokyo"},
                assistant,
                {"role": "tool", "tool_call_id": call.id, "content": "11 degrees"},
            ],
            tools=[WEATHER],
        )
        assert follow_up.choices[0].message.content == "Echo: the tool said 11 degrees"

        stream = await client.chat.completions.create(
            model="llama-public",
            messages=[{"role": "user", "content": "Oslo"}],
            tools=[WEATHER],
            stream=True,
        )
        streamed = [c async for c in stream]
    tool_deltas = [t for c in streamed for t in c.choices[0].delta.tool_calls or []]
    assert [t.function.arguments for t in tool_deltas if t.function] == ['{"city":"Oslo"}']
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


async def test_json_mode_and_schema(proxy: TestClient, fake_ollama: FakeOllama) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
    }
    async with client_for(proxy) as client:
        chat = await client.chat.completions.create(
            model="llama-public", messages=MESSAGES, response_format={"type": "json_object"}
        )
        assert json.loads(chat.choices[0].message.content or "") == {"answer": ANSWER}
        assert fake_ollama.requests[-1].body["format"] == "json"
        structured: Any = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
        await client.chat.completions.create(
            model="llama-public", messages=MESSAGES, response_format=structured
        )
        assert fake_ollama.requests[-1].body["format"] == schema


def sync_calls(url: str) -> tuple[str, str, str]:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    with client:
        chat = client.chat.completions.create(model="llama-public", messages=MESSAGES)
        stream = client.chat.completions.create(
            model="llama-public", messages=MESSAGES, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        completion = client.completions.create(
            model="llama-public", prompt="Once upon", stream=True
        )
        text = "".join(c.choices[0].text for c in completion if c.choices)
        return chat.choices[0].message.content or "", streamed, text


async def test_sync_client(proxy: TestClient) -> None:
    # The sync client blocks, so it runs in a thread while this loop serves the proxy.
    chat, streamed, text = await asyncio.to_thread(sync_calls, str(proxy.make_url("/v1")))
    assert chat == streamed == ANSWER
    assert text == "Echo: Once upon"


async def test_model_not_pulled_is_404(proxy: TestClient, fake_ollama: FakeOllama) -> None:
    fake_ollama.models.pop("llama3.2:latest")
    async with client_for(proxy) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="llama-public", messages=MESSAGES)
    assert "ollama pull" in info.value.message
    assert "llama3.2" not in info.value.message  # the alias hides the upstream tag
    ready = await proxy.get("/readyz")
    assert ready.status == 503
    assert "ollama pull llama3.2:latest" in (await ready.json())["reason"]


async def test_readyz(proxy: TestClient) -> None:
    ready = await proxy.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"


async def test_mid_stream_error_is_a_final_error_event(
    proxy: TestClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.error_after, fake_ollama.chunk_delay = 2, 0.02
    async with client_for(proxy) as client:
        stream = await client.chat.completions.create(
            model="llama-public", messages=MESSAGES, stream=True
        )
        seen: list[str] = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "Echo: why "
    assert "an error was encountered while running the model" in info.value.message


async def test_error_statuses(proxy: TestClient, fake_ollama: FakeOllama) -> None:
    async with client_for(proxy) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="llama-public", messages=MESSAGES, n=2)
        assert bad.value.status_code == 400 and "'n' must be 1" in bad.value.message

        fake_ollama.fail_status, fake_ollama.retry_after = 429, "3"
        fake_ollama.fail_message = "too many requests"
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="llama-public", messages=MESSAGES)
        assert limited.value.response.headers["Retry-After"] == "3"

        fake_ollama.fail_status, fake_ollama.fail_message = 500, "model runner crashed"
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="llama-public", messages=MESSAGES)
        assert failed.value.status_code == 502 and "model runner crashed" in failed.value.message

        fake_ollama.fail_status, fake_ollama.garbage = None, True
        with pytest.raises(openai.InternalServerError) as garbage:
            await client.chat.completions.create(model="llama-public", messages=MESSAGES)
        assert garbage.value.status_code == 502 and "not valid JSON" in garbage.value.message


async def test_check_probe_tells_the_operator(aiohttp_server: Any, fake_ollama: FakeOllama) -> None:
    server: TestServer = await aiohttp_server(fake_ollama.app())
    config = {"backend_provider": "ollama", "url": upstream_url(server)}
    assert await probe(build_config(config | {"model_name_alias": "llama3.2"})) is None
    reason = await probe(build_config(config | {"model_name_alias": "qwen3:8b"}))
    assert reason is not None and "run `ollama pull qwen3:8b`" in reason
