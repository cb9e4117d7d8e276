"""The in-process engine (``backend_provider: vllm``, no ``url``) through the real ``openai``
client: chat and completions, streamed and not, errors, batching, aborts, metrics, reload.

The tiny model decodes greedily without ever choosing EOS, so every greedy answer runs to
``max_tokens`` (``finish_reason == "length"``) unless a stop string ends it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest

from proxy.server.reload import RELOADER
from proxy.server.runtime import RUNTIME
from tests.adapters.vllm.conftest import FIGURES, PUBLIC, SLOW, Served

pytestmark = SLOW

MESSAGES: Any = [{"role": "system", "content": "You are terse."},
                 {"role": "user", "content": "Hello world"}]


def client(proxy: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)


async def test_readyz_said_loading_until_the_engine_was_in(engine_proxy: Served) -> None:
    assert engine_proxy.not_ready, "/readyz was never 503 while the engine loaded"
    assert all(status == 503 and "loading" in reason
               for status, reason in engine_proxy.not_ready)
    async with aiohttp.ClientSession() as s, s.get(engine_proxy.url + "/v1/models") as r:
        models = await r.json()
    assert [m["id"] for m in models["data"]] == [PUBLIC]
    assert models["data"][0]["metadata"]["warm"] is True


async def test_chat_and_completion(engine_proxy: Served) -> None:
    async with client(engine_proxy) as c:
        chat = await c.chat.completions.create(model=PUBLIC, messages=MESSAGES, max_tokens=12,
                                               temperature=0)
        assert chat.model == PUBLIC
        choice = chat.choices[0]
        assert choice.message.role == "assistant" and choice.message.content
        assert choice.finish_reason == "length"
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 12
        assert chat.usage.prompt_tokens > 5  # the chat template's text is in it
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + 12

        done = await c.completions.create(model=PUBLIC, prompt="The quick brown fox",
                                          max_tokens=10, temperature=0)
        assert done.model == PUBLIC and done.object == "text_completion"
        assert done.choices[0].text and done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.completion_tokens == 10


async def test_streams_match_whole_answers(engine_proxy: Served) -> None:
    async with client(engine_proxy) as c:
        whole = await c.chat.completions.create(model=PUBLIC, messages=MESSAGES, max_tokens=16,
                                                temperature=0)
        stream = await c.chat.completions.create(
            model=PUBLIC, messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert all(chunk.model == PUBLIC for chunk in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == whole.choices[0].message.content
        finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
        assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 16

        whole_c = await c.completions.create(model=PUBLIC, prompt="Once upon", max_tokens=16,
                                             temperature=0)
        stream_c = await c.completions.create(model=PUBLIC, prompt="Once upon", max_tokens=16,
                                              temperature=0, stream=True)
        pieces = [chunk async for chunk in stream_c]
        assert "".join(p.choices[0].text for p in pieces) == whole_c.choices[0].text
        assert pieces[-1].choices[0].finish_reason == "length"
        assert all(p.usage is None for p in pieces)  # not asked for


async def test_same_request_same_bytes(engine_proxy: Served) -> None:
    body = {"model": PUBLIC, "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    sampled = {**body, "temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 7}
    async with aiohttp.ClientSession() as s:
        async def answer(payload: dict[str, Any], stream: bool = False) -> bytes:
            url = engine_proxy.url + "/v1/chat/completions"
            async with s.post(url, json={**payload, "stream": stream}) as r:
                assert r.status == 200
                if stream:
                    return await r.read()
                data = await r.json()
                return data["choices"][0]["message"]["content"].encode()

        first, second = await answer(body), await answer(body)
        assert first == second and len(first) > 10
        assert await answer(sampled) == await answer(sampled)  # seeded sampling repeats too
        streamed = await answer(body, stream=True)
        assert b"[DONE]" in streamed


async def test_stop_penalties_and_max_tokens_over_the_context(engine_proxy: Served) -> None:
    async with client(engine_proxy) as c:
        free = await c.completions.create(model=PUBLIC, prompt="Once upon", max_tokens=32,
                                          temperature=0)
        text = free.choices[0].text
        assert "e" in text  # else pick another stop string for this model
        stopped = await c.completions.create(model=PUBLIC, prompt="Once upon", max_tokens=32,
                                             temperature=0, stop=["e"])
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == text[: text.index("e")]

        penalised = await c.completions.create(
            model=PUBLIC, prompt="Once upon", max_tokens=32, temperature=0,
            presence_penalty=1.5, frequency_penalty=1.5)
        assert penalised.choices[0].text != text

        # More than the context has room for: a 400, as from vLLM's server.
        with pytest.raises(openai.BadRequestError) as info:
            await c.completions.create(model=PUBLIC, prompt="Once upon", max_tokens=100_000,
                                       temperature=0)
        assert "cannot be greater than max_model_len=512" in info.value.message
        assert info.value.body["param"] == "max_tokens"  # type: ignore[index]


async def test_engine_refusals_are_400_with_the_reason(engine_proxy: Served) -> None:
    async with client(engine_proxy) as c:
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(
                model=PUBLIC, messages=[{"role": "user", "content": "hello world " * 400}])
        assert "maximum context length is 512 tokens" in info.value.message
        assert info.value.body["param"] == "input_tokens"  # type: ignore[index]

        with pytest.raises(openai.BadRequestError) as info:
            await c.completions.create(model=PUBLIC, prompt="hi", top_p=0, stream=True)
        assert "top_p must be in (0, 1]" in info.value.message

        with pytest.raises(openai.BadRequestError) as info:  # vLLM's own request model
            await c.chat.completions.create(model=PUBLIC, messages=MESSAGES,
                                            response_format={"type": "json_schema"})
        assert info.value.body["param"] == "response_format"  # type: ignore[index]

        with pytest.raises(openai.APIStatusError) as status:
            await c.embeddings.create(model=PUBLIC, input="hello")
        assert status.value.status_code == 501
        assert "does not support Embeddings API" in status.value.message


async def test_concurrent_requests_are_batched(engine_proxy: Served) -> None:
    stats = engine_proxy.adapter.stats
    prompts = [f"Prompt number {i}" for i in range(8)]
    peak = 0
    running = True

    async def watch() -> None:
        nonlocal peak
        while running:
            peak = max(peak, int(stats()["engine_running_requests"]))
            await asyncio.sleep(0.005)

    async with client(engine_proxy) as c:
        async def one(prompt: str) -> str:
            stream = await c.completions.create(model=PUBLIC, prompt=prompt, max_tokens=64,
                                                temperature=0, stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

        watcher = asyncio.create_task(watch())
        started = time.perf_counter()
        answers = await asyncio.gather(*(one(p) for p in prompts))
        seconds = time.perf_counter() - started
        running = False
        await watcher
        solo_started = time.perf_counter()
        solo = await one(prompts[3])
        solo_seconds = time.perf_counter() - solo_started
    assert peak > 1, "the engine never ran two requests at once"
    assert solo == answers[3]  # batching does not change greedy output
    FIGURES["8 concurrent x 64 tokens (through the proxy)"] = (
        f"{8 * 64 / seconds:.0f} tok/s, peak running {peak}")
    FIGURES["1 request x 64 tokens (through the proxy)"] = f"{64 / solo_seconds:.0f} tok/s"


async def test_client_disconnect_aborts_the_engine_request(engine_proxy: Served) -> None:
    adapter = engine_proxy.adapter
    llm = adapter.engine.llm
    body = {"model": PUBLIC, "prompt": "Abort me", "max_tokens": 450, "temperature": 0,
            "stream": True}
    async with aiohttp.ClientSession() as s:
        response = await s.post(engine_proxy.url + "/v1/completions", json=body)
        assert response.status == 200
        await response.content.readline()
        assert llm.get_num_unfinished_requests() == 1
        await asyncio.sleep(0.3)  # some engine steps, each one recorded
        assert (await vllm_metrics(engine_proxy))['vllm:num_requests_running{engine="0",'
                                                  f'model_name="{PUBLIC}"}}'] == 1
        response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while llm.get_num_unfinished_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert llm.get_num_unfinished_requests() == 0
    await asyncio.sleep(0.3)  # one more engine step for the stat loggers
    assert adapter.stats()["engine_running_requests"] == 0
    assert (await vllm_metrics(engine_proxy))['vllm:num_requests_running{engine="0",'
                                              f'model_name="{PUBLIC}"}}'] == 0


async def test_metrics_carry_the_engine_numbers(engine_proxy: Served) -> None:
    async with aiohttp.ClientSession() as s, s.get(engine_proxy.url + "/metrics") as r:
        text = await r.text()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("model_proxy_upstream_engine_")}
    assert values["model_proxy_upstream_engine_loaded"] == 1
    assert values["model_proxy_upstream_engine_generation_tokens"] > 100
    assert values["model_proxy_upstream_engine_prompt_tokens"] > 10
    assert 0 <= values["model_proxy_upstream_engine_kv_cache_usage"] <= 1
    assert "model_proxy_upstream_engine_waiting_requests" in values
    assert 'model_proxy_tokens_total{direction="out"}' in text
    # vLLM's own, under the names vLLM's server exports them with.
    ours = await vllm_metrics(engine_proxy)
    label = f'{{engine="0",model_name="{PUBLIC}"}}'
    assert ours["vllm:generation_tokens_total" + label] > 100
    assert ours["vllm:prompt_tokens_total" + label] > 10
    assert "vllm:num_requests_waiting" + label in ours
    assert any(name.startswith("vllm:e2e_request_latency_seconds_bucket") for name in ours)


async def vllm_metrics(proxy: Served) -> dict[str, float]:
    """The ``vllm:`` series on the proxy's ``/metrics``, by name with labels."""
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        text = await r.text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("vllm:")}


async def test_reload_keeps_the_running_engine(engine_proxy: Served) -> None:
    runtime = engine_proxy.app[RUNTIME]
    before = runtime.current().adapter
    engine = before.engine
    path = runtime.config_path
    assert path is not None
    with open(path, encoding="utf-8") as f:
        original = f.read()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original + "\nlimits: {max_concurrency: 32}\n")
        started = time.perf_counter()
        assert await engine_proxy.app[RELOADER].reload()
        assert time.perf_counter() - started < 2, "the reload loaded the engine again"
        after = runtime.current().adapter
        assert after is not before and after.engine is engine
        async with client(engine_proxy) as c:
            chat = await c.chat.completions.create(model=PUBLIC, messages=MESSAGES, max_tokens=4)
        assert chat.usage is not None and chat.usage.completion_tokens == 4
        await engine_proxy.app[RELOADER].close()  # the replaced adapter lets go of it...
        assert engine.users == 1 and engine.llm is not None  # ...but the engine stays
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
