"""The built-in mock backend: deterministic answers derived from SHA-256(model, prompt)."""

from __future__ import annotations

import hashlib

from proxy.adapters.mock import WORDS
from tests.conftest import StartProxy

MOCK = {"backend_provider": "mock"}


async def test_same_request_same_bytes_different_prompt_different_text(
    start_proxy: StartProxy,
) -> None:
    client = await start_proxy(MOCK)
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    first = await (await client.post("/v1/chat/completions", json=body)).json()
    second = await (await client.post("/v1/chat/completions", json=body)).json()
    assert first["choices"] == second["choices"]
    other = {"model": "m", "messages": [{"role": "user", "content": "hello!"}]}
    third = await (await client.post("/v1/chat/completions", json=other)).json()
    assert third["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]
    renamed = {**body, "model": "m2"}
    fourth = await (await client.post("/v1/chat/completions", json=renamed)).json()
    assert fourth["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]


async def test_text_is_derived_from_sha256_of_model_and_prompt(start_proxy: StartProxy) -> None:
    client = await start_proxy(MOCK)
    resp = await client.post(
        "/v1/completions", json={"model": "m", "prompt": "abc", "max_tokens": 4}
    )
    answer = await resp.json()
    seed = hashlib.sha256(b"m\0abc").digest()
    block = hashlib.sha256(seed + (0).to_bytes(4, "big")).digest()
    assert answer["choices"][0]["text"] == " ".join(WORDS[b % len(WORDS)] for b in block[:4])
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}


async def test_stream_with_usage_and_bad_max_tokens(start_proxy: StartProxy) -> None:
    client = await start_proxy(MOCK)
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    raw = (await resp.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    assert '"usage":{"prompt_tokens":2,"completion_tokens":16' in raw
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m", "messages": [], "max_tokens": -3}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "max_tokens"


async def test_embeddings_are_unit_vectors(start_proxy: StartProxy) -> None:
    client = await start_proxy(MOCK)
    resp = await client.post("/v1/embeddings", json={"model": "m", "input": "x", "dimensions": 40})
    vector = (await resp.json())["data"][0]["embedding"]
    assert len(vector) == 40
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-9
