"""What the proxy tells clients about itself and its upstream: no address, no versions."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import StartProxy, free_port, upstream_url
from tests.fakes.openai_upstream import FakeOpenAI

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_an_unreachable_upstream_is_named_in_the_log_only(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    client = await start_proxy({"backend_provider": "custom", "url": f"http://127.0.0.1:{port}",
                                "retries": {"attempts": 1}})
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 502
        message = (await resp.json())["error"]["message"]
        assert message.startswith("the upstream is unreachable")
        assert str(port) not in message and "127.0.0.1" not in message
    resp = await client.get("/readyz")
    reason = (await resp.json())["reason"]
    assert resp.status == 503 and str(port) not in reason and "127.0.0.1" not in reason
    logged = [r.message for r in caplog.records if f"127.0.0.1:{port}" in r.message]
    assert len(logged) == 1, logged  # the address, once: the same failure is not repeated


async def raw(client: TestClient, request: bytes) -> bytes:
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    return head


async def test_every_answer_names_a_neutral_server(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI,
) -> None:
    client = await start_proxy({"backend_provider": "custom",
                                "url": upstream_url(openai_upstream)})
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}'
    requests: list[Any] = [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n{",
    ]
    for request in requests:
        head = await raw(client, request)
        lines = head.lower().split(b"\r\n")
        assert b"server: model-backend-proxy" in lines, head
        assert b"aiohttp" not in head and b"python" not in head and b"fake" not in head
    metrics = await (await client.get("/metrics")).text()
    assert "_created" not in metrics
