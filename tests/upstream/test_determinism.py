"""``determinism: {enforce: true, seed: N}``: the sampling every request is sent with, and the
SHA-256 of the output text on every answer (header and body; a stream's last chunk)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from proxy.upstream.determinism import HEADER
from tests.conftest import StartProxy, upstream_url
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI

ASK = {"messages": [{"role": "user", "content": "name three colours"}],
       "temperature": 1.3, "top_p": 0.5, "top_k": 7, "seed": 99, "max_tokens": 20}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def whole(client: TestClient, model: str) -> tuple[str, str, str]:
    resp = await client.post("/v1/chat/completions", json={**ASK, "model": model})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    return resp.headers[HEADER], body["output_sha256"], body["choices"][0]["message"]["content"]


async def streamed(client: TestClient, model: str) -> tuple[str, str]:
    resp = await client.post("/v1/chat/completions", json={**ASK, "model": model,
                                                           "stream": True})
    assert resp.status == 200
    raw = await resp.read()
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    last = orjson.loads(events[-2])
    assert last["choices"] == []
    text = "".join(c["delta"].get("content") or "" for e in events[:-2]
                   for c in orjson.loads(e).get("choices") or [])
    return last["output_sha256"], text


async def check_same_hash(client: TestClient, model: str) -> str:
    first, second = await whole(client, model), await whole(client, model)
    assert first == second
    header, in_body, text = first
    assert header == in_body == sha(text) and text
    hashed, text = await streamed(client, model)
    assert hashed == sha(text) == header  # a stream of the same answer: the same hash
    assert (await streamed(client, model))[0] == header
    return header


async def test_the_mock_gives_the_same_hash_twice(start_proxy: StartProxy) -> None:
    client = await start_proxy({"backend_provider": "mock", "determinism": {"enforce": True}})
    await check_same_hash(client, "m")


async def test_the_fake_ollama_gets_forced_sampling_and_gives_the_same_hash(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    fake = FakeOllama()
    up = await aiohttp_server(fake.app())
    client = await start_proxy({"backend_provider": "ollama", "url": upstream_url(up),
                                "model_name_alias": "llama3.2", "model": {"name": "l"},
                                "determinism": {"enforce": True, "seed": 42}})
    await check_same_hash(client, "l")
    chats = [r.body for r in fake.requests if r.path == "/api/chat"]
    assert len(chats) == 4
    for body in chats:
        options = body["options"]
        assert (options["temperature"], options["top_p"], options["top_k"],
                options["seed"]) == (0, 1, 0, 42)


async def test_an_openai_upstream_gets_the_seed_and_no_top_k(
    start_proxy: StartProxy, aiohttp_server: Any, fake_openai: FakeOpenAI
) -> None:
    up = await aiohttp_server(fake_openai.app())
    client = await start_proxy({"backend_provider": "custom", "url": upstream_url(up),
                                "determinism": {"enforce": True, "seed": 7}})
    header, _, text = await whole(client, "m")
    assert header == sha(text)
    sent = next(s.json() for s in fake_openai.seen if s.path == "/v1/chat/completions")
    assert (sent["temperature"], sent["top_p"], sent["seed"]) == (0, 1, 7)
    assert "top_k" not in sent


async def test_without_enforce_requests_and_answers_are_untouched(
    start_proxy: StartProxy, aiohttp_server: Any, fake_openai: FakeOpenAI
) -> None:
    up = await aiohttp_server(fake_openai.app())
    client = await start_proxy({"backend_provider": "custom", "url": upstream_url(up),
                                "determinism": {"enforce": False}})
    resp = await client.post("/v1/chat/completions", json={**ASK, "model": "m"})
    assert HEADER not in resp.headers and "output_sha256" not in await resp.json()
    sent = next(s.json() for s in fake_openai.seen if s.path == "/v1/chat/completions")
    assert (sent["temperature"], sent["top_k"], sent["seed"]) == (1.3, 7, 99)
