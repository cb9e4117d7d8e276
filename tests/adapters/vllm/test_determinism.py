"""Determinism against the real in-process engine, through its public HTTP API: a proxy that
enforces ``determinism:`` in front of the engine's proxy gets byte-identical answers (and the
same ``X-Output-SHA256``) for identical requests, whatever sampling the client asked for."""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
import orjson

from tests.adapters.vllm.conftest import PUBLIC, SLOW, Served, serve

pytestmark = SLOW

ASK: Any = {"model": PUBLIC, "messages": [{"role": "user", "content": "Count with me"}],
            "max_tokens": 16, "temperature": 1.5, "top_p": 0.7}


async def test_identical_requests_give_identical_hashes(engine_proxy: Served) -> None:
    front = await serve({"backend_provider": "custom", "url": engine_proxy.url,
                         "determinism": {"enforce": True, "seed": 1234}})
    try:
        hashes, texts = [], []
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(front.url + "/v1/chat/completions", json=ASK) as r:
                    assert r.status == 200, await r.text()
                    body = await r.json()
                    hashes.append(r.headers["X-Output-SHA256"])
                    texts.append(body["choices"][0]["message"]["content"])
                    assert body["output_sha256"] == hashes[-1]
            async with session.post(front.url + "/v1/chat/completions",
                                    json={**ASK, "stream": True}) as r:
                raw = await r.read()
        assert len(set(hashes)) == 1 and len(set(texts)) == 1 and texts[0]
        assert hashes[0] == hashlib.sha256(texts[0].encode()).hexdigest()
        events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
        assert events[-1] == b"[DONE]"
        assert orjson.loads(events[-2])["output_sha256"] == hashes[0]
    finally:
        await front.runner.cleanup()
