"""The real ``openai`` package, sync and async, against the running proxy (mock and custom)."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import StartProxy, upstream_url

MESSAGES: Any = [{"role": "user", "content": "Say something deterministic."}]


def base_url(client: TestClient) -> str:
    return str(client.make_url("/v1"))


@pytest.fixture(params=["mock", "custom"])
async def proxy(
    request: pytest.FixtureRequest, start_proxy: StartProxy, openai_upstream: TestServer
) -> TestClient:
    if request.param == "mock":
        return await start_proxy({"backend_provider": "mock", "model": {"name": "tiny"}})
    return await start_proxy(
        {
            "backend_provider": "custom",
            "url": upstream_url(openai_upstream),
            "model": {"name": "tiny"},
            "model_name_alias": "up-model",
        }
    )


async def test_async_client(proxy: TestClient) -> None:
    client = openai.AsyncOpenAI(base_url=base_url(proxy), api_key="unused", max_retries=0)
    async with client:
        chat = await client.chat.completions.create(model="tiny", messages=MESSAGES)
        assert chat.choices[0].message.content
        assert chat.model in ("tiny", "up-model")
        assert chat.usage is not None and chat.usage.completion_tokens > 0

        stream = await client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == chat.choices[0].message.content

        completion = await client.completions.create(model="tiny", prompt="Once upon")
        assert completion.choices[0].text
        emb = await client.embeddings.create(model="tiny", input=["a", "b"])
        assert [d.index for d in emb.data] == [0, 1]

        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]

        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="other", messages=MESSAGES)
        assert info.value.status_code == 404
        assert "not served here" in info.value.message


def sync_calls(url: str) -> tuple[str, str, str]:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    with client:
        chat = client.chat.completions.create(model="tiny", messages=MESSAGES)
        stream = client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        completion = client.completions.create(model="tiny", prompt="Once upon", stream=True)
        text = "".join(c.choices[0].text for c in completion if c.choices)
        return chat.choices[0].message.content or "", streamed, text


async def test_sync_client(proxy: TestClient) -> None:
    # the sync client blocks, so it runs in a thread while this loop serves the proxy
    chat, streamed, text = await asyncio.to_thread(sync_calls, base_url(proxy))
    assert chat and chat == streamed
    assert text


async def test_bad_request_is_an_openai_error(proxy: TestClient) -> None:
    client = openai.AsyncOpenAI(base_url=base_url(proxy), api_key="unused", max_retries=0)
    async with client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="tiny", messages=MESSAGES, extra_body={"stream": "yes"}
            )
        assert info.value.body == {
            "message": "stream must be true or false",
            "type": "invalid_request_error",
            "param": "stream",
            "code": None,
        }
        # the client reads the proxy's request id from the header (the body's top-level
        # request_id is beside "error", which the client unwraps)
        assert info.value.request_id
        assert info.value.request_id == info.value.response.json()["request_id"]
