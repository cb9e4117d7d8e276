"""``url`` mode: the proxy in front of a real vLLM OpenAI server, started here on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from tests.adapters.vllm.conftest import PUBLIC, SERVED_NAME, SERVER_KEY, SLOW, serve

pytestmark = SLOW

KEY = SERVER_KEY
MESSAGES: Any = [{"role": "user", "content": "Hello world"}]


def proxy_config(url: str, key: str) -> dict[str, Any]:
    return {"backend_provider": "vllm", "url": url, "api_key": key,
            "model": {"name": PUBLIC}, "model_name_alias": SERVED_NAME,
            "retries": {"attempts": 1}}


async def test_proxy_fronts_a_vllm_server(vllm_server: str, engine_proxy: Any) -> None:
    proxy = await serve(proxy_config(vllm_server, KEY))
    try:
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/readyz") as r:
            assert r.status == 200, await r.text()
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused",
                                      max_retries=0) as c:
            chat = await c.chat.completions.create(model=PUBLIC, messages=MESSAGES,
                                                   max_tokens=12, temperature=0)
            assert chat.choices[0].finish_reason == "length"
            assert chat.usage is not None and chat.usage.completion_tokens == 12
            stream = await c.chat.completions.create(model=PUBLIC, messages=MESSAGES,
                                                     max_tokens=12, temperature=0, stream=True)
            text = "".join([ch.choices[0].delta.content or ""
                            async for ch in stream if ch.choices])
            assert text == chat.choices[0].message.content
            with pytest.raises(openai.BadRequestError) as info:
                await c.completions.create(model=PUBLIC, prompt="hello world " * 400)
            assert "maximum context length" in info.value.message
        # The same model, greedy, in the proxy's own engine: the same text.
        async with openai.AsyncOpenAI(base_url=engine_proxy.url + "/v1", api_key="unused",
                                      max_retries=0) as c:
            local = await c.chat.completions.create(model=PUBLIC, messages=MESSAGES,
                                                    max_tokens=12, temperature=0)
        assert local.choices[0].message.content == chat.choices[0].message.content
    finally:
        await proxy.runner.cleanup()


async def test_wrong_key_is_reported_by_readiness(vllm_server: str) -> None:
    proxy = await serve(proxy_config(vllm_server, "wrong"))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/readyz") as r:
                assert r.status == 503
                assert "rejected this node's credentials" in (await r.json())["reason"]
            body = {"model": PUBLIC, "messages": MESSAGES, "max_tokens": 2}
            async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
                # vLLM's 401 is this node's credential problem, not the caller's: a 502
                assert r.status == 502
                error = (await r.json())["error"]
                assert error["code"] == "upstream_auth_failed"
                assert "Unauthorized" not in error["message"]
    finally:
        await proxy.runner.cleanup()
