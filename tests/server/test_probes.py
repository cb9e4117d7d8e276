"""``HEAD /healthz`` and ``HEAD /readyz`` answer as their GET does, without a body: load
balancers and uptime checks probe with HEAD. Read off the wire, so that a body sent after
the head would be seen."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient

from proxy.server.runtime import RUNTIME
from tests.conftest import StartProxy


async def raw_head(client: TestClient, path: str) -> tuple[int, bytes]:
    """The status of ``HEAD path`` and every byte after the head, until the proxy closes."""
    server = client.server
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    await writer.wait_closed()
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_head_on_a_probe_is_its_get_without_a_body(
    start_proxy: StartProxy, path: str
) -> None:
    # inbound auth on: the probes stay open to HEAD as to GET
    client = await start_proxy({"backend_provider": "mock", "auth": {"api_keys": ["k"]}})
    assert (await client.get(path)).status == 200
    status, rest = await raw_head(client, path)
    assert (status, rest) == (200, b"")


async def test_head_on_readyz_says_not_ready_as_get_does(start_proxy: StartProxy) -> None:
    client = await start_proxy({"backend_provider": "mock"})
    client.app[RUNTIME].shutting_down = True  # as on SIGTERM: /readyz answers 503
    assert (await client.get("/readyz")).status == 503
    assert await raw_head(client, "/readyz") == (503, b"")
