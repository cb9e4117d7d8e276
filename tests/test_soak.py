"""Soak: 50,000 mixed requests through a real ``model-proxy serve`` process; memory stays flat.

The proxy runs as its own process (so its resident memory is its own) in front of a fast fake
upstream in this process. Requests mix plain and streamed chat, embeddings, and streams the
client abandons after the first event. Resident memory after the run must be within a small
margin of the memory after warm-up: nothing may grow per request.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import free_port, upstream_url

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 5_000
TOTAL = 50_000
CONCURRENCY = 32
#: Allowed growth of resident memory between warm-up and the end.
MARGIN_BYTES = 8 * 1024 * 1024

COMPLETION = (b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
              b'"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}')
EMBEDDING = (b'{"object":"list","model":"m",'
             b'"data":[{"object":"embedding","index":0,"embedding":[0.5]}]}')
EVENT = (b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[{"index":0,"delta":{"content":"w"},"finish_reason":null}]}\n\n')


def fast_upstream() -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream": true' not in body and b'"stream":true' not in body:
            return web.Response(body=COMPLETION, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(8):
            await response.write(EVENT)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def embeddings(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=EMBEDDING, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")




async def one(session: aiohttp.ClientSession, base: str, n: int) -> str:
    kind = n % 20
    chat = {"model": "m", "messages": [{"role": "user", "content": f"q{n}"}]}
    if kind < 9:
        async with session.post(base + "/v1/chat/completions", json=chat) as resp:
            await resp.read()
            return "ok" if resp.status == 200 else f"status {resp.status}"
    if kind < 16:
        async with session.post(base + "/v1/chat/completions",
                                json={**chat, "stream": True}) as resp:
            body = await resp.read()
            return "ok" if body.endswith(b"data: [DONE]\n\n") else "bad stream"
    if kind < 18:
        async with session.post(base + "/v1/embeddings", json={"model": "m", "input": "x"}) as resp:
            await resp.read()
            return "ok" if resp.status == 200 else f"status {resp.status}"
    resp = await session.post(base + "/v1/chat/completions", json={**chat, "stream": True})
    await resp.content.readline()
    resp.close()  # the client goes away mid-stream
    return "aborted"


async def drive(base: str, start: int, stop: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    next_n = start
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal next_n
            while next_n < stop:
                n = next_n
                next_n += 1
                outcome = await one(session, base, n)
                counts[outcome] = counts.get(outcome, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return counts


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_memory_stays_flat_over_50000_requests(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    upstream: TestServer = await aiohttp_server(fast_upstream())
    port = free_port()
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump({
        "backend_provider": "custom", "url": upstream_url(upstream),
        "server": {"port": port}, "logging": {"access_log": False},
    }))
    log = (tmp_path / "proxy.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "-c", str(path),
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                async with aiohttp.ClientSession() as session, session.get(base + "/healthz"):
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        started = time.monotonic()
        warm = await drive(base, 0, WARMUP)
        after_warmup = rss(process.pid)
        rest = await drive(base, WARMUP, TOTAL)
        await asyncio.sleep(0.5)  # let abandoned streams finish their clean-up
        at_end = rss(process.pid)
        seconds = time.monotonic() - started
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/metrics") as resp:
                metrics = await resp.text()
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=30)
        log.close()
    counts = {k: warm.get(k, 0) + rest.get(k, 0) for k in {*warm, *rest}}
    mib = 1024 * 1024
    print(f"\nsoak: {TOTAL} requests in {seconds:.1f} s ({TOTAL / seconds:.0f}/s), "
          f"outcomes {counts}; RSS after {WARMUP} warm-up {after_warmup / mib:.1f} MiB, "
          f"at end {at_end / mib:.1f} MiB, growth {(at_end - after_warmup) / mib:+.2f} MiB")
    assert counts["ok"] + counts["aborted"] == TOTAL, counts
    assert at_end - after_warmup < MARGIN_BYTES
    in_flight = [line for line in metrics.splitlines()
                 if line.startswith("model_proxy_in_flight_requests ")]
    assert in_flight == ["model_proxy_in_flight_requests 0.0"]
