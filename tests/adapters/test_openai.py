"""OpenAI-compatible upstreams (``custom``, a vLLM server) through the proxy: every answer names
the model the client asked for, and the tokens the upstream reports are counted."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import StartProxy, upstream_url
from tests.fakes.openai_upstream import FakeOpenAI

CHAT = {"model": "public", "messages": [{"role": "user", "content": "hi"}]}


def config(server: TestServer, provider: str = "custom") -> dict[str, Any]:
    return {"backend_provider": provider, "url": upstream_url(server),
            "model": {"name": "public"}, "model_name_alias": "upstream-7b"}


def events(body: bytes) -> list[Any]:
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    lines = [line for line in body.split(b"\n\n") if line]
    assert all(line.startswith(b"data: ") for line in lines)
    return [json.loads(line[6:]) for line in lines[:-1]]


async def metric(client: TestClient, name: str) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    return {m[1] or "": float(m[2])
            for m in re.finditer(rf"^{name}(?:\{{(.*)\}})? (\S+)$", text, re.M)}


@pytest.mark.parametrize("provider", ["custom", "vllm"])
@pytest.mark.parametrize("answer_model", [None, "llama-own-name.gguf"])
async def test_every_answer_names_the_model_asked_for(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI,
    provider: str, answer_model: str | None,
) -> None:
    """The upstream says its own name (the configured alias, or one of its own choosing, as
    llama.cpp's server does); the client sees the public name, streamed or not."""
    fake_openai.answer_model = answer_model
    client = await start_proxy(config(openai_upstream, provider))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert (await resp.json())["model"] == "public"
    resp = await client.post("/v1/completions", json={"model": "public", "prompt": "x"})
    assert (await resp.json())["model"] == "public"
    resp = await client.post("/v1/embeddings", json={"model": "public", "input": ["a", "b"]})
    assert (await resp.json())["model"] == "public"
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    chunks = events(await resp.read())
    assert len(chunks) == fake_openai.chunks + 1
    assert {chunk["model"] for chunk in chunks} == {"public"}
    assert fake_openai.seen[-1].json()["model"] == "upstream-7b"
    # the name given back is one the proxy serves
    resp = await client.post("/v1/chat/completions", json={**CHAT, "model": chunks[0]["model"]})
    assert resp.status == 200


async def test_tokens_are_counted_and_the_usage_event_stays_the_proxys(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI,
) -> None:
    client = await start_proxy(config(openai_upstream))
    await client.post("/v1/chat/completions", json=CHAT)  # 3 in, 3 out
    await client.post("/v1/embeddings", json={"model": "public", "input": ["a", "b"]})  # 2 in
    assert await metric(client, "model_proxy_tokens_total") == {
        'direction="in"': 5, 'direction="out"': 3}
    # a stream whose client did not ask for usage: the proxy asks, reads, and drops the event
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    chunks = events(await resp.read())
    assert all("usage" not in chunk and chunk["choices"] for chunk in chunks)
    sent = fake_openai.seen[-1].json()
    assert sent["stream_options"] == {"include_usage": True}
    assert await metric(client, "model_proxy_tokens_total") == {
        'direction="in"': 8, 'direction="out"': 6}
    # a client that asks gets the event, as the upstream sent it (with the public name)
    resp = await client.post("/v1/chat/completions", json={
        **CHAT, "stream": True, "stream_options": {"include_usage": True}})
    last = events(await resp.read())[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    assert last["model"] == "public"
    assert await metric(client, "model_proxy_tokens_total") == {
        'direction="in"': 11, 'direction="out"': 9}
    speeds = await metric(client, "model_proxy_upstream_tokens_per_second_count")
    assert speeds == {"": 2}
    assert await metric(client, "model_proxy_usage_missing_total") == {}


async def test_an_upstream_without_usage_is_counted_as_such(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI,
) -> None:
    fake_openai.usage = False
    client = await start_proxy(config(openai_upstream))
    await client.post("/v1/chat/completions", json=CHAT)
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert len(events(await resp.read())) == fake_openai.chunks + 1
    await client.post("/v1/embeddings", json={"model": "public", "input": "a"})
    assert await metric(client, "model_proxy_tokens_total") == {}
    assert await metric(client, "model_proxy_usage_missing_total") == {
        'endpoint="chat"': 2, 'endpoint="embeddings"': 1}


@pytest.mark.parametrize("status", [401, 403])
async def test_an_upstream_refusing_the_nodes_credentials_is_a_502(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI,
    caplog: pytest.LogCaptureFixture, status: int,
) -> None:
    fake_openai.fail_status, fake_openai.fail_times = status, 10
    fake_openai.fail_body = {"error": "Unauthorized"}
    client = await start_proxy({**config(openai_upstream), "api_key": "sk-node-secret-3"})
    for body in (CHAT, {**CHAT, "stream": True}):
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 502
        error = (await resp.json())["error"]
        assert error["code"] == "upstream_auth_failed"
        assert error["message"] == "the upstream rejected this node's credentials"
    assert 'model_proxy_upstream_errors_total{kind="upstream_auth_failed"} 2.0' in await (
        await client.get("/metrics")).text()
    loud = [r for r in caplog.records if r.levelname == "ERROR" and "credentials" in r.message]
    assert len(loud) == 1  # once, not once per request
    assert str(status) in loud[0].message and upstream_url(openai_upstream) in loud[0].message
    assert "sk-node-secret-3" not in caplog.text
