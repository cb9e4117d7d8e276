"""``model_proxy_upstream_up`` follows the upstream with no one polling ``/readyz``: answers
and failures set it, a background probe keeps it current, and an open circuit reads 0."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from proxy.config import build_config
from proxy.server.app import create_app
from proxy.server.runtime import RUNTIME
from tests.conftest import StartProxy, upstream_url
from tests.fakes.openai_upstream import FakeOpenAI

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def up(client: TestClient) -> float:
    text = await (await client.get("/metrics")).text()
    match = re.search(r"^model_proxy_upstream_up (\S+)$", text, re.M)
    assert match is not None
    return float(match[1])


async def until_up(client: TestClient, value: float, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while await up(client) != value:
        assert time.monotonic() < deadline, f"upstream_up never became {value}"
        await asyncio.sleep(0.05)


async def test_answers_and_failures_set_it(
    start_proxy: StartProxy, openai_upstream: TestServer
) -> None:
    client = await start_proxy({"backend_provider": "custom", "url": upstream_url(openai_upstream),
                                "retries": {"attempts": 1}})
    assert await up(client) == 0  # nothing known yet
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert await up(client) == 1
    await openai_upstream.close()
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 502
    assert await up(client) == 0


async def test_the_background_probe_keeps_it_current(
    aiohttp_client: Any, aiohttp_server: Any
) -> None:
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app())
    app = create_app(build_config({"backend_provider": "custom", "url": upstream_url(server)}))
    app[RUNTIME].readiness.probe_every = 0.1
    client = await aiohttp_client(app)
    await until_up(client, 1)
    assert any(seen.path == "/v1/models" for seen in fake.seen)
    await server.close()
    await until_up(client, 0)


async def test_an_open_circuit_reads_0(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy({"backend_provider": "custom", "url": upstream_url(openai_upstream),
                                "retries": {"attempts": 1}, "circuit": {"failures": 2}})
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert await up(client) == 1
    fake_openai.fail_status, fake_openai.fail_times, fake_openai.fail_body = 503, 2, {}
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 503
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert (await resp.json())["error"]["code"] == "circuit_open"
    # the upstream's own readiness path answers fine meanwhile; the circuit decides
    assert (await client.get("/readyz")).status == 503
    assert await up(client) == 0
